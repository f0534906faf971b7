"""Hub entry point for ddpm_hf's DDPMPipeline (needs ``pip install ddpm_hf``).

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(repo_or_folder, custom_pipeline="pipeline_ddpm_hf", trust_remote_code=True)

diffusers builds the components that model_index.json names (its own UNet2DModel and DDPMScheduler or
DDIMScheduler); this class swaps them for ddpm_hf's classes, whose configs and weights are interchangeable, so
scheduler options that stock diffusers lacks or gets wrong (quad spacing, its prev-timestep and variance bugs)
sample correctly.
"""

from diffusers import ModelMixin, SchedulerMixin

try:
    import ddpm_hf.pipeline  # a module, not the class: diffusers wants one pipeline class in this file's namespace
    import ddpm_hf.sharing
except ImportError as error:
    raise ImportError("This checkpoint samples with ddpm_hf's classes: pip install ddpm_hf") from error


class DDPMHFPipeline(ddpm_hf.pipeline.DDPMPipeline):
    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin):
        super().__init__(*ddpm_hf.sharing.to_ddpm_hf_components(unet, scheduler))
