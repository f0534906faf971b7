"""The scheduler contract and registry: ours implement it, diffusers' schedulers get an adapter, loops agree."""

import diffusers
import numpy as np
import pytest
import torch

import ddpm_hf
from ddpm_hf.schedulers import (
    SCHEDULERS,
    SchedulerContract,
    contract_for,
    deterministic_ddim,
    scheduler_class,
    to_ddpm_hf_scheduler,
)
from ddpm_hf.schedulers.adapters import DiffusersSchedulerAdapter

SHAPE = (2, 1, 4, 4)
SOLVERS = ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
           "HeunDiscreteScheduler", "DDPMScheduler", "DDIMScheduler"]


def toy_eps(x, t):
    return 0.8 * torch.tanh(x) + 0.05 * float(t) / 1000


def contract_loop(scheduler, generator_seed=0, **set_kwargs):
    """A pipeline-style loop that asks only the contract (what PIPE's pipeline does)."""
    contract = contract_for(scheduler)
    timesteps = contract.set_inference_timesteps(**set_kwargs)
    generator = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * contract.init_noise_sigma
    kwargs = contract.step_kwargs(generator=generator)
    for t in timesteps:
        x = contract.step(toy_eps(contract.scale_model_input(x, t), t), t, x, **kwargs).prev_sample
    return x


def diffusers_loop(scheduler, num_inference_steps, generator_seed=0):
    """The loop diffusers' own pipelines run (e.g. StableDiffusionPipeline), written out with the known keywords."""
    scheduler.set_timesteps(num_inference_steps)
    generator = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
    takes_generator = type(scheduler).__name__ not in ("UniPCMultistepScheduler", "HeunDiscreteScheduler")
    for t in scheduler.timesteps:
        out = toy_eps(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **({"generator": generator} if takes_generator else {})).prev_sample
    return x


def test_ours_are_their_own_contract_and_diffusers_get_an_adapter_over_their_state():
    ours = ddpm_hf.DDIMScheduler()
    assert isinstance(ours, SchedulerContract) and contract_for(ours) is ours
    stock = diffusers.EulerDiscreteScheduler()
    adapter = contract_for(stock)
    assert isinstance(adapter, DiffusersSchedulerAdapter) and isinstance(adapter, SchedulerContract)
    assert adapter.scheduler is stock and adapter.stock_class_name == "EulerDiscreteScheduler"
    adapter.set_inference_timesteps(5)
    assert stock.timesteps is adapter.timesteps is contract_for(stock).timesteps and len(stock.timesteps) == 5
    with pytest.raises(TypeError, match="SchedulerMixin"):
        DiffusersSchedulerAdapter(object())


@pytest.mark.parametrize("name, expected", [
    ("DPMSolverMultistepScheduler", 20), ("UniPCMultistepScheduler", 20), ("EulerDiscreteScheduler", 50),
    ("HeunDiscreteScheduler", 25), ("DDPMScheduler", 1000), ("DDIMScheduler", 50), ("LMSDiscreteScheduler", 50),
])
def test_default_step_counts(name, expected):
    assert contract_for(getattr(diffusers, name)()).default_num_inference_steps() == expected
    assert contract_for(getattr(diffusers, name)(num_train_timesteps=12)).default_num_inference_steps() == 12


def test_default_step_counts_of_ours():
    assert ddpm_hf.DDPMScheduler(num_train_timesteps=300).default_num_inference_steps() == 300
    assert ddpm_hf.DDIMScheduler(num_train_timesteps=300).default_num_inference_steps() == 50
    assert ddpm_hf.DDIMScheduler(num_train_timesteps=30).default_num_inference_steps() == 30
    assert len(ddpm_hf.DDIMScheduler().set_inference_timesteps()) == 50


def test_dpm_solver_without_a_step_count_samples():
    """The old default (T = 1000 steps, chosen because DPMSolver's step takes no eta) gives no image."""
    finite = torch.isfinite(contract_loop(diffusers.DPMSolverMultistepScheduler())).all()
    assert finite
    try:
        old = torch.isfinite(diffusers_loop(diffusers.DPMSolverMultistepScheduler(), 1000)).all()
    except IndexError:
        old = False
    assert not old


@pytest.mark.parametrize("name", SOLVERS)
def test_adapter_loop_equals_diffusers_own_loop(name):
    """Through the adapter (init_noise_sigma, scale_model_input, the step keywords it found) every solver samples
    as in diffusers' own pipelines."""
    steps = 6
    ours = contract_loop(getattr(diffusers, name)(), num_inference_steps=steps)
    reference = diffusers_loop(getattr(diffusers, name)(), steps)
    assert torch.isfinite(ours).all() and torch.equal(ours, reference)


def test_step_kwargs_follow_what_step_takes():
    g = torch.Generator()
    assert contract_for(diffusers.UniPCMultistepScheduler()).step_kwargs(generator=g) == {}
    assert contract_for(diffusers.DPMSolverMultistepScheduler()).step_kwargs(generator=g) == {"generator": g}
    assert contract_for(diffusers.DDIMScheduler()).step_kwargs(eta=0.5, generator=g) == {"generator": g, "eta": 0.5}
    assert ddpm_hf.DDIMScheduler().step_kwargs(eta=1.0, use_clipped_model_output=True) == {
        "generator": None, "eta": 1.0, "use_clipped_model_output": True}
    assert ddpm_hf.DDPMScheduler().step_kwargs(generator=g) == {"generator": g}
    for scheduler in (ddpm_hf.DDPMScheduler(), diffusers.EulerDiscreteScheduler()):
        with pytest.raises(ValueError, match="eta=0.5 needs a scheduler whose step takes eta"):
            contract_for(scheduler).step_kwargs(eta=0.5)
        with pytest.raises(ValueError, match="use_clipped_model_output needs a DDIMScheduler"):
            contract_for(scheduler).step_kwargs(use_clipped_model_output=False)
    for eta in (1.5, -0.1, True, "0"):
        with pytest.raises(ValueError, match="eta must be a float in"):
            ddpm_hf.DDIMScheduler().step_kwargs(eta=eta)


@pytest.mark.parametrize("scheduler", [ddpm_hf.DDPMScheduler(num_train_timesteps=50),
                                       diffusers.DDPMScheduler(num_train_timesteps=50)], ids=["ours", "diffusers"])
def test_set_inference_timesteps_arguments(scheduler):
    contract = contract_for(scheduler)
    assert contract.set_inference_timesteps(timesteps=np.array([40, 7, 0])).tolist() == [40, 7, 0]
    assert contract.set_inference_timesteps(timesteps=torch.tensor([9, 3])).tolist() == [9, 3]
    assert contract.set_inference_timesteps(5, device="cpu").tolist() == [40, 30, 20, 10, 0]
    assert len(contract.set_inference_timesteps()) == 50
    with pytest.raises(ValueError, match="not both"):
        contract.set_inference_timesteps(3, timesteps=[5, 1])
    for bad in (0, -2, True, 2.5, "3"):
        with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
            contract.set_inference_timesteps(bad)
    with pytest.raises(TypeError, match="timesteps must be a list of ints"):
        contract.set_inference_timesteps(timesteps=[5.0, 1.0])


def test_custom_timesteps_only_where_set_timesteps_takes_them():
    with pytest.raises(ValueError, match="DDIMScheduler.set_timesteps does not"):
        contract_for(diffusers.DDIMScheduler()).set_inference_timesteps(timesteps=[900, 10])
    assert ddpm_hf.DDIMScheduler().set_inference_timesteps(timesteps=[900, 10]).tolist() == [900, 10]


def test_scale_model_input_is_the_schedulers_own():
    x = torch.randn(SHAPE)
    euler = diffusers.EulerDiscreteScheduler()
    contract = contract_for(euler)
    contract.set_inference_timesteps(4)
    expected = diffusers.EulerDiscreteScheduler()
    expected.set_timesteps(4)
    assert torch.equal(contract.scale_model_input(x, contract.timesteps[0]),
                       expected.scale_model_input(x, expected.timesteps[0]))
    assert float(contract.init_noise_sigma) == float(expected.init_noise_sigma) > 1
    assert ddpm_hf.DDPMScheduler().scale_model_input(x, 3) is x


def stock_ddpm_pipeline_images(scheduler, steps=4):
    """Images from stock diffusers' DDPMPipeline (the class a saved folder names) with a tiny diffusers UNet."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(8,),
                                 down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                                 layers_per_block=1, norm_num_groups=4)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return unet, pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(3), output_type="np").images


def contract_images(unet, scheduler, steps=4):
    contract = contract_for(scheduler)
    timesteps = contract.set_inference_timesteps(steps)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((1, 1, 4, 4), generator=generator) * contract.init_noise_sigma
    with torch.no_grad():
        for t in timesteps:
            out = unet(contract.scale_model_input(x, t), t).sample
            x = contract.step(out, t, x, **contract.step_kwargs(generator=generator)).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", SOLVERS)
def test_adapter_stock_divergences_match_stock_ddpm_pipeline(name):
    """[] exactly where stock DDPMPipeline gives the contract loop's images (it passes generator to step and
    neither scales the noise nor the model input)."""
    reasons = contract_for(getattr(diffusers, name)()).stock_divergences()
    try:
        unet, stock = stock_ddpm_pipeline_images(getattr(diffusers, name)())
    except TypeError as error:  # UniPC/Heun: step() got an unexpected keyword argument 'generator'
        assert "generator" in str(error)
        assert any("takes no generator" in r for r in reasons), reasons
        return
    same = np.allclose(stock, contract_images(unet, getattr(diffusers, name)()), atol=1e-6)
    assert same == (not reasons), reasons


def test_scheduler_class():
    assert scheduler_class("DDPMScheduler") is ddpm_hf.DDPMScheduler
    assert scheduler_class("DDIMScheduler") is ddpm_hf.DDIMScheduler
    assert scheduler_class("EulerDiscreteScheduler") is diffusers.EulerDiscreteScheduler
    for bad in ("UNet2DModel", "NoSuchScheduler", None, ["diffusers", "DDPMScheduler"]):
        with pytest.raises(ValueError, match="neither one of ddpm_hf's"):
            scheduler_class(bad)


def test_to_ddpm_hf_scheduler():
    stock = diffusers.DDIMScheduler(num_train_timesteps=200, timestep_spacing="trailing", clip_sample=False)
    ours = to_ddpm_hf_scheduler(stock)
    assert type(ours) is ddpm_hf.DDIMScheduler
    assert {k: ours.config[k] for k in stock.config if not k.startswith("_")} == {
        k: v for k, v in stock.config.items() if not k.startswith("_")}
    assert type(to_ddpm_hf_scheduler(diffusers.DDPMScheduler())) is ddpm_hf.DDPMScheduler
    euler, mine = diffusers.EulerDiscreteScheduler(), ddpm_hf.DDPMScheduler()
    assert to_ddpm_hf_scheduler(euler) is euler and to_ddpm_hf_scheduler(mine) is mine


@pytest.mark.parametrize("source", [
    ddpm_hf.DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, thresholding=True,
                          prediction_type="v_prediction", variance_type="fixed_large"),
    diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", thresholding=True),
    ddpm_hf.DDIMScheduler(set_alpha_to_one=False, timestep_spacing="quad"),
], ids=["ours-ddpm", "dpm-solver", "ours-ddim"])
def test_deterministic_ddim_keeps_the_schedule_and_drops_clipping(source):
    ddim = deterministic_ddim(source)
    assert type(ddim) is ddpm_hf.DDIMScheduler and not ddim.config.clip_sample and not ddim.config.thresholding
    for key in ("beta_schedule", "prediction_type", "timestep_spacing", "num_train_timesteps"):
        assert ddim.config[key] == source.config[key]
    assert ddim.config.set_alpha_to_one == source.config.get("set_alpha_to_one", True)
    expected = ddpm_hf.diffusion_math.NoiseSchedule.from_config(source.config).alphas_cumprod
    assert torch.equal(ddim.noise_schedule.alphas_cumprod, expected)
    x = 3 * torch.ones(1, 1, 2, 2, dtype=torch.float64)  # x_0 far outside [-1, 1] stays unclipped
    ddim.set_timesteps(5)
    out = ddim.step(torch.zeros_like(x), ddim.timesteps[-1], x).pred_original_sample
    assert out.abs().min() > 1.0


def test_a_new_scheduler_is_one_class_and_one_registry_line(monkeypatch):
    """What issue 10 asks: a class implementing the contract plus one SCHEDULERS line, nothing else."""

    class ToyScheduler(ddpm_hf.DDIMScheduler):
        stock_class_name = "ToyScheduler"  # no diffusers counterpart

        def default_num_inference_steps(self) -> int:
            return 3

    monkeypatch.setitem(SCHEDULERS, "ToyScheduler", ToyScheduler)
    cls = scheduler_class("ToyScheduler")
    scheduler = cls(num_train_timesteps=20)
    assert cls is ToyScheduler and contract_for(scheduler) is scheduler
    assert scheduler.set_inference_timesteps().tolist() == [12, 6, 0]
    assert scheduler.stock_divergences() == ["ToyScheduler has no diffusers counterpart"]
