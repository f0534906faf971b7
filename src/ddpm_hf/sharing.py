"""The diffusers-compatibility layer of ``DDPMPipeline``: what a saved folder names, the remote-code fallback, loading.

- **Saving.** ddpm_hf's ``UNet2DModel``, ``DDPMScheduler`` and ``DDIMScheduler`` share their diffusers
  counterparts' names, configs and weights, so ``model_index.json`` records them as ``["diffusers", <class>]``
  and stock diffusers loads the folder without ddpm_hf. Where stock diffusers would sample the saved scheduler
  differently (``stock_divergences``), the folder instead names the remote-code pipeline
  ``pipeline_ddpm_hf.DDPMHFPipeline`` and carries that file, so stock diffusers refuses it unless
  ``trust_remote_code=True``; its scheduler entry then names the same file (``_remote_index``). A class-conditional
  unet is always saved so (``remote_code_reasons``): stock ``DDPMPipeline`` cannot pass class labels.
- **Loading.** ``DDPMPipeline.from_pretrained`` is diffusers' own ``DiffusionPipeline.from_pretrained`` (every
  loader feature: ``torch_dtype``, ``device_map``, ``variant``, ``revision``, ...) reading the folder's index
  with ddpm_hf's classes in place of diffusers' (``_loader_index``): a folder that names the remote-code
  pipeline is read as this pipeline (no code from the folder runs), and components that name a diffusers class
  ddpm_hf implements are built with ddpm_hf's class, which this module exposes to diffusers' loader.

diffusers' loader facts relied on here (diffusers 0.42.1, ``pipelines/pipeline_loading_utils.py``): a component
whose library is not diffusers/transformers resolves from ``sys.modules`` and needs the loader base classes
(``ModelMixin``, ``SchedulerMixin``) in that module's namespace; a list ``_class_name`` with a matching ``.py`` file
is remote code.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import diffusers
from diffusers import ModelMixin, SchedulerMixin  # noqa: F401  (diffusers' loader looks these names up here)
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES

from .models import UNet2DModel
from .schedulers.registry import contract_for, scheduler_class, to_ddpm_hf_scheduler
from .shipped_files import shipped_file

HUB_PIPELINE_MODULE = "pipeline_ddpm_hf"
HUB_PIPELINE_CLASS = "DDPMHFPipeline"
# The Hub-facing file, written next to model_index.json when stock diffusers would sample a saved scheduler
# wrongly: the text of pipelines/pipeline_ddpm_hf.py.
HUB_PIPELINE_SOURCE = shipped_file("pipeline_ddpm_hf.py.txt", "pipelines/pipeline_ddpm_hf.py").read_text()
_LOADER_LIBRARY = __name__  # what _loader_index names, so diffusers' loader finds ddpm_hf's classes below
_logger = diffusers.utils.logging.get_logger(__name__)


def is_ddpm_hf(obj: Any) -> bool:
    """Whether ``obj`` (or the module ``torch.compile`` wrapped) is an instance of a ddpm_hf class."""
    return type(getattr(obj, "_orig_mod", obj)).__module__.split(".")[0] == "ddpm_hf"


def stock_divergences(scheduler: SchedulerMixin) -> list[str]:
    """Why stock diffusers would sample this scheduler's saved config differently from us (empty if it would not).

    Asked of the scheduler's contract (``ddpm_hf.schedulers.registry``), which decides it from what stock
    diffusers does with the config.
    """
    return contract_for(scheduler).stock_divergences()


def remote_code_reasons(unet: ModelMixin | None, scheduler: SchedulerMixin) -> list[str]:
    """Why a folder must name the remote-code pipeline (empty: stock ``DDPMPipeline`` samples it as we do).

    Stock diffusers' ``DDPMPipeline`` calls ``unet(image, t)`` with no class labels, so a class-conditional unet
    (``num_class_embeds`` set) is never left to it, whatever its scheduler.
    """
    reasons = list(stock_divergences(scheduler))
    num_class_embeds = (getattr(unet, "config", None) or {}).get("num_class_embeds")
    if num_class_embeds is not None:
        reasons.append(f"the unet is class-conditional (num_class_embeds={num_class_embeds}) and stock "
                       "DDPMPipeline cannot pass class_labels")
    return reasons


def to_ddpm_hf_unet(unet: ModelMixin) -> ModelMixin:
    """diffusers' ``UNet2DModel`` -> ddpm_hf's (same config and weights, device, dtype and train/eval mode);
    anything else unchanged."""
    if type(unet) is not diffusers.UNet2DModel:
        return unet
    ours = UNet2DModel.from_config(unet.config)
    ours.load_state_dict(unet.state_dict())
    return ours.to(device=unet.device, dtype=unet.dtype).train(unet.training)


def to_ddpm_hf_components(unet: ModelMixin, scheduler: SchedulerMixin) -> tuple[ModelMixin, SchedulerMixin]:
    """Swap diffusers' ``UNet2DModel`` and the schedulers ddpm_hf implements for ddpm_hf's (same config, same
    weights); anything else is returned unchanged. Used by the remote-code pipeline, whose components diffusers
    builds."""
    return to_ddpm_hf_unet(unet), to_ddpm_hf_scheduler(scheduler)


def __getattr__(name: str) -> type:
    """ddpm_hf's scheduler classes by their diffusers name, for diffusers' loader (see ``_loader_index``)."""
    if _ours(name):
        return scheduler_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ours(scheduler_name: str) -> bool:
    """Whether the registry builds a scheduler of this model_index name with a ddpm_hf class."""
    try:
        return scheduler_class(scheduler_name).__module__.startswith("ddpm_hf.")
    except ValueError:  # not a scheduler name: diffusers' loader reports it
        return False


def _loader_entry(name: str, entry: Any) -> Any:
    """A model_index component entry, re-pointed at ddpm_hf's class where ddpm_hf implements the named one
    (entries naming the remote-code file, see ``_remote_index``, included: its code is not run)."""
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] in ("diffusers", HUB_PIPELINE_MODULE)):
        return entry
    if (name == "unet" and entry[1] == "UNet2DModel") or (name == "scheduler" and _ours(entry[1])):
        return [_LOADER_LIBRARY, entry[1]]
    return entry


def _remote_index(index: dict[str, Any]) -> dict[str, Any]:
    """model_index.json of a remote-code folder: the pipeline, and a ddpm_hf scheduler, come from the folder's
    ``pipeline_ddpm_hf.py`` (a copy sits in ``scheduler/``, where diffusers looks for a component's code).

    Stock diffusers builds the components before the remote pipeline could swap them, and some configs are ones
    diffusers' own class refuses (DDIM with ``sigmoid``); built by the remote file's name, the scheduler is
    ddpm_hf's from the start.
    """
    index = {**index, "_class_name": [HUB_PIPELINE_MODULE, HUB_PIPELINE_CLASS]}
    entry = index.get("scheduler")
    if isinstance(entry, list) and len(entry) == 2 and entry[0] == "diffusers" and _ours(entry[1]):
        index["scheduler"] = [HUB_PIPELINE_MODULE, entry[1]]
    return index


def _check_library(folder: str, name: str, entry: Any) -> None:
    """A component's library must be one diffusers' loader can resolve (diffusers 0.42.1
    ``_get_library_or_raise``: a library it loads from, a ``diffusers.pipelines`` module, a module this process
    imported, or code shipped as ``<component>/<library>.py``); else a ValueError naming the file and entry."""
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
        return
    library = entry[0]
    if (library in LOADABLE_CLASSES or hasattr(diffusers.pipelines, library) or library in sys.modules
            or os.path.isfile(os.path.join(folder, name, f"{library}.py"))):
        return
    raise ValueError(f"{os.path.join(folder, 'model_index.json')} names {name} {list(entry)}: {library!r} is not a "
                     "library diffusers loads from, nor imported in this process, nor shipped as "
                     f"{name}/{library}.py in the folder")


def _loader_index(index: dict[str, Any], folder: str | None) -> dict[str, Any]:
    """model_index.json as ddpm_hf's pipeline reads it: its own remote-code pipeline is itself, and the
    components ddpm_hf implements load with ddpm_hf's classes; entries no loader could resolve are refused."""
    if folder is not None:
        for name, entry in index.items():
            if not name.startswith("_"):
                _check_library(folder, name, entry)
    return {name: _loader_entry(name, entry) for name, entry in index.items()}


class SharingMixin:
    """Saving and loading for ``DDPMPipeline`` (mixed in before ``diffusers.DiffusionPipeline``)."""

    def __setattr__(self, name: str, value: Any):
        super().__setattr__(name, value)
        # diffusers records a class outside diffusers under its module path, which stock diffusers cannot load;
        # ddpm_hf's components share their diffusers counterparts' names, configs and weights.
        if name in ("unet", "scheduler") and is_ddpm_hf(value):
            self.register_to_config(**{name: ("diffusers", type(getattr(value, "_orig_mod", value)).__name__)})

    def to_json_string(self) -> str:
        """model_index.json: stock ``DDPMPipeline``, or the remote-code file where stock would sample wrongly."""
        index = json.loads(super().to_json_string())
        remote = remote_code_reasons(getattr(self, "unet", None), self.scheduler)
        index = _remote_index(index) if remote else {**index, "_class_name": "DDPMPipeline"}
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Write model_index.json and, when it names them, the remote-code pipeline file beside it and in
        ``scheduler/``."""
        hub_files = [os.path.join(save_directory, *sub, f"{HUB_PIPELINE_MODULE}.py") for sub in ((), ("scheduler",))]
        reasons = remote_code_reasons(getattr(self, "unet", None), self.scheduler)
        for hub_file in hub_files:
            if reasons:
                os.makedirs(os.path.dirname(hub_file), exist_ok=True)
                with open(hub_file, "w", encoding="utf-8") as f:
                    f.write(HUB_PIPELINE_SOURCE)
            elif os.path.isfile(hub_file):
                os.remove(hub_file)
        if reasons:
            _logger.warning("Stock diffusers' DDPMPipeline would not sample this pipeline as ddpm_hf does (%s); the "
                            "saved pipeline needs trust_remote_code=True and ddpm_hf to load.", "; ".join(reasons))
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """diffusers' ``save_pretrained`` (model_index.json via ``to_json_string``/``save_config`` above).

        A ``pathlib.Path`` is accepted also with ``push_to_hub=True`` (diffusers 0.42.1 calls ``str.split`` on it).
        """
        super().save_pretrained(os.fspath(save_directory), *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a DDPM/DDIM pipeline folder or Hub repo (saved by ddpm_hf or stock diffusers) with ddpm_hf's classes.

        This is ``diffusers.DiffusionPipeline.from_pretrained`` with every argument it takes (``unet=``/
        ``scheduler=`` objects to use instead of loading, ``torch_dtype``, ``device_map``, ``variant``,
        ``use_safetensors``, ``low_cpu_mem_usage``, ``revision``, ``cache_dir``, ``token``, ``local_files_only``,
        ``custom_pipeline``, ...); only the classes differ: a ``UNet2DModel`` or ``DDPMScheduler``/
        ``DDIMScheduler`` the folder names is built as ddpm_hf's class (other classes as diffusers' loader builds
        them), and a folder naming the remote-code ``pipeline_ddpm_hf`` loads as this class, running no code from
        the folder.

        Args:
            pretrained_model_name_or_path: a local folder or a Hub repo id.
            kwargs: passed to ``diffusers.DiffusionPipeline.from_pretrained``.

        Returns:
            The pipeline.
        """
        return super().from_pretrained(os.fspath(pretrained_model_name_or_path), **kwargs)

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        # Every model_index.json diffusers' loader reads for this class comes through here (``load_config`` and
        # the Hub ``download``): the remote-code pipeline ddpm_hf writes is this class, so it is read as such and
        # diffusers neither asks for trust_remote_code nor imports the folder's file.
        index = super()._dict_from_json_file(json_file)
        if index.get("_class_name") == [HUB_PIPELINE_MODULE, HUB_PIPELINE_CLASS]:
            index["_class_name"] = "DDPMPipeline"
        return index

    @classmethod
    def load_config(cls, *args, **kwargs):
        # ``from_pretrained`` builds each component from the index this returns. The Hub download reads the
        # entries as written (through ``_dict_from_json_file``): it checks that each names diffusers or a code
        # file the repo has, which ``ddpm_hf.sharing`` is not.
        out = super().load_config(*args, **kwargs)
        folder = os.fspath(args[0]) if args and os.path.isdir(os.fspath(args[0])) else None
        if isinstance(out, tuple):
            return (_loader_index(out[0], folder), *out[1:])
        return _loader_index(out, folder)
