"""Hub entry point for ddpm_hf's DDPMPipeline (needs ``pip install ddpm_hf``).

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(repo_or_folder, custom_pipeline="pipeline_ddpm_hf", trust_remote_code=True)

diffusers builds the components that model_index.json names: a folder that ddpm_hf saved as remote code names
its scheduler from this file (a copy sits in ``scheduler/``), so diffusers builds ddpm_hf's scheduler directly;
this class swaps diffusers' UNet2DModel (and a DDPMScheduler/DDIMScheduler of diffusers, e.g. with
``custom_pipeline=`` on a stock checkpoint) for ddpm_hf's classes, whose configs and weights are interchangeable,
so scheduler options that stock diffusers lacks or gets wrong (quad spacing, its prev-timestep and variance bugs,
DDIM with the sigmoid schedule) sample correctly. A class-conditional checkpoint is always saved this way (stock
``DDPMPipeline`` cannot pass class labels); ``id2label`` comes from model_index.json, so
``pipe(batch_size=8, class_labels="7", guidance_scale=2.0)`` works.
"""

from diffusers import ModelMixin, SchedulerMixin

try:
    import ddpm_hf.pipeline  # a module, not the class: diffusers wants one pipeline class in this file's namespace
    import ddpm_hf.sharing
except ImportError as error:
    raise ImportError("This checkpoint samples with ddpm_hf's classes: pip install ddpm_hf") from error


def __getattr__(name: str) -> type:
    """ddpm_hf's scheduler classes by name: a remote-code folder's model_index builds its scheduler from here."""
    return getattr(ddpm_hf.sharing, name)


class DDPMHFPipeline(ddpm_hf.pipeline.DDPMPipeline):
    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin, id2label: dict | None = None):
        super().__init__(*ddpm_hf.sharing.to_ddpm_hf_components(unet, scheduler), id2label=id2label)
