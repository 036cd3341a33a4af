"""disback: Distribution Backtracking for one-step diffusion distillation, as an add-on.

The public API is re-exported here; the methods live in :mod:`disback_core.adapters`.
"""

from .analytic import GaussianMixtureDenoiser
from .attach import Attachment, attach
from .backtracking import Backtrack
from .denoisers import (
    CFGDenoiser,
    Denoiser,
    DiffusersDenoiser,
    EDMPrecond,
    OneStepGenerator,
    Unconditional,
    as_sigma,
    check_denoiser,
    check_sample,
    check_start,
    first_noise,
    first_step,
    freeze,
    make_generator,
    timestep_generator,
    trainable_copy,
)
from .export import export_generator, load_checkpoint, load_generator, read_export_note
from .faults import DivergenceMonitor, NonFiniteGuard
from .fewstep import (
    DMD2_SDXL_TIMESTEPS,
    MultiStepGenerator,
    fewstep_sigmas,
    make_fewstep_generator,
    sample_fewstep,
    timesteps_to_sigmas,
)
from .flow import (
    FlowMatchDenoiser,
    flow_generator,
    flow_shift,
    flow_sigmas,
    flux_mu,
    make_flow_generator,
)
from .freezing import FreezeReport, apply_freezing, freeze_modules, gddi_frozen_modules
from .gan import GANHead, capture_features, default_feature_module
from .guidance import default_final_sigma, distillation_pp_sample
from .interpolate import target_at, write_position
from .lora import (
    FLUX_TARGETS,
    SANA_FF_TARGETS,
    SANA_TARGETS,
    SD3_FF_TARGETS,
    SD3_TARGETS,
    WAN_FF_TARGETS,
    WAN_TARGETS,
    LoraSpec,
    LoraTarget,
    lora_targets,
)
from .losses import DSMLoss, abs_mean_normaliser, check_finite, gan_discriminator_loss, gan_generator_loss, r1_penalty
from .nets import MLPNet, UNetNet, edm_mlp, edm_unet
from .presets import TINY_PRESETS, build_model, example_cond, sample_shape
from .protocol import DSMFakeScore, LossDict, ScoreDistiller
from .recording import DegradationRecorder, probe_inputs, probe_inputs_raw, record_degradation
from .schedules import AdaptiveGap, Budgeted, FixedInterval, LinearPath, NodeCursor, TeacherOnly, score_gap
from .sharded_state import load_sharded_state, save_sharded_state
from .shared_base import SharedBasePath, attach_adapter, bare_view
from .sigmas import (
    KarrasContinuousSigma,
    KarrasIndexSigma,
    LogitNormalSigma,
    LogNormalSigma,
    SigmaSampler,
    UniformTimeSigma,
    edm_weight,
    flow_weight,
    karras_sigmas,
)
from .state import latest_state, list_states, load_state, save_state
from .step import Batch, as_batch, call_generator, critic_step, generator_step, train_step
from .storage import StorageError
from .trajectory import Probe, Trajectory, TrajectoryTarget, call_conventions, register_call

__version__ = "0.1.0"

__all__ = [
    "Denoiser",
    "EDMPrecond",
    "DiffusersDenoiser",
    "FlowMatchDenoiser",
    "flow_generator",
    "make_flow_generator",
    "flow_sigmas",
    "flow_shift",
    "flux_mu",
    "LogitNormalSigma",
    "UniformTimeSigma",
    "flow_weight",
    "TINY_PRESETS",
    "build_model",
    "example_cond",
    "sample_shape",
    "CFGDenoiser",
    "OneStepGenerator",
    "check_start",
    "first_step",
    "first_noise",
    "make_generator",
    "trainable_copy",
    "freeze",
    "check_sample",
    "as_sigma",
    "GaussianMixtureDenoiser",
    "MLPNet",
    "UNetNet",
    "edm_mlp",
    "edm_unet",
    "SigmaSampler",
    "LogNormalSigma",
    "KarrasIndexSigma",
    "KarrasContinuousSigma",
    "karras_sigmas",
    "edm_weight",
    "DSMLoss",
    "abs_mean_normaliser",
    "check_finite",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "r1_penalty",
    "GANHead",
    "default_feature_module",
    "SD3_TARGETS",
    "SD3_FF_TARGETS",
    "FLUX_TARGETS",
    "SANA_TARGETS",
    "SANA_FF_TARGETS",
    "WAN_TARGETS",
    "WAN_FF_TARGETS",
    "capture_features",
    "ScoreDistiller",
    "DSMFakeScore",
    "LossDict",
    "Batch",
    "as_batch",
    "call_generator",
    "critic_step",
    "generator_step",
    "train_step",
    "StorageError",
    "LoraSpec",
    "LoraTarget",
    "lora_targets",
    "Trajectory",
    "SharedBasePath",
    "attach_adapter",
    "bare_view",
    "register_call",
    "call_conventions",
    "probe_inputs_raw",
    "TrajectoryTarget",
    "Probe",
    "record_degradation",
    "DegradationRecorder",
    "probe_inputs",
    "Backtrack",
    "FixedInterval",
    "AdaptiveGap",
    "Budgeted",
    "LinearPath",
    "target_at",
    "write_position",
    "TeacherOnly",
    "NodeCursor",
    "score_gap",
    "attach",
    "Attachment",
    "Unconditional",
    "check_denoiser",
    "save_state",
    "save_sharded_state",
    "load_sharded_state",
    "load_state",
    "latest_state",
    "list_states",
    "NonFiniteGuard",
    "DivergenceMonitor",
    "MultiStepGenerator",
    "make_fewstep_generator",
    "sample_fewstep",
    "fewstep_sigmas",
    "timesteps_to_sigmas",
    "DMD2_SDXL_TIMESTEPS",
    "distillation_pp_sample",
    "default_final_sigma",
    "FreezeReport",
    "apply_freezing",
    "freeze_modules",
    "gddi_frozen_modules",
    "timestep_generator",
    "export_generator",
    "load_generator",
    "read_export_note",
    "load_checkpoint",
]
