"""DisBack on one shared base: the path served as a second peft adapter (LoRA memory).

The common memory-saving layout of LoRA distillation on one GPU (diffusers' LCM-LoRA scripts, DMD2's
``--generator_lora``) keeps ONE base model: the generator is a peft LoRA adapter on it, and the
teacher is the same base with the adapter disabled. :func:`~disback_core.attach.attach` cannot run
there: it writes node weights into the base, which would move the generator too. A path of LoRA
nodes is itself an adapter set, so :class:`SharedBasePath` serves node ``k`` as a second peft adapter
on that same base (no copy of the base; the nodes stay on the CPU, one node's factors on the device):

    view = bare_view(unet)                          # the teacher: the base's own tensors, adapters off
    traj = Trajectory.load("path/", view)           # or DegradationRecorder(view, fake_unet, ...)
    path = SharedBasePath(unet, traj, FixedInterval(500), fake=fake_unet)
    ...
    with path.target():                             # node k's adapter only (node 0: no adapter at all)
        eps_real = unet(noisy, t, encoder_hidden_states=c).sample
    eps_real = path(noisy, t, encoder_hidden_states=c).sample  # the same call, in one line
    eps_gen = unet(z, t_gen, encoder_hidden_states=c).sample   # the generator, as before
    path.step()                                     # after each generator update

- Switching to node ``k`` copies node ``k``'s ``lora_A``/``lora_B`` factors into the path adapter's
  weights in place (``copy_``); its scaling is the trajectory's ``LoraSpec.scale``, checked on every
  layer. The base's weights and the generator's adapter are never written.
- Outside :meth:`SharedBasePath.target` the path adapter is inactive on every layer, so the generator
  computes exactly what it computed without it (layers the path adds a peft wrapper to run their
  base layer alone). Inside, every peft layer of the base runs the path adapter only; the previous
  active adapters and enabled flags are put back on exit, also on an exception. The switch sets
  peft's per-layer state (``_active_adapter``, ``_disable_adapters``) directly: peft's own
  ``set_adapter``/``enable_adapters`` also flip ``requires_grad`` and train flags of the adapters,
  which the user's generator must keep.
- The path adapter's parameters never require gradients; ``requires_grad`` of every other parameter
  is as it was before the path was added (peft's injection is undone where it touches them).
- :meth:`SharedBasePath.detach` removes the path adapter: the base's modules, state dict, peft
  config, active adapters and flags are as before.

While attached, the base's state dict holds the path adapter's keys (``...lora_A.disback_path.weight``)
and the layers the path added a wrapper to are named ``<layer>.base_layer.weight``: save the
generator's adapter (``get_peft_model_state_dict(unet, adapter_name="default")``) or detach first.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from .attach import _finer_copy, _name, _prefix, _unwrap
from .lora import _A, _B, _backend, _target, node_layers
from .schedules import NodeCursor, TeacherOnly, required_schedule
from .storage import lowest_float_dtype, tensors_fingerprint
from .trajectory import Trajectory, _deepcopy_quietly, _max_error, _state, node_references, probe_output

__all__ = ["SharedBasePath", "attach_adapter", "bare_view", "PATH_ADAPTER"]

PATH_ADAPTER = "disback_path"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _tuner_layer_cls() -> type:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return cast(type, BaseTunerLayer)


def _lora_layer_cls() -> type:
    from peft.tuners.lora import LoraLayer

    return cast(type, LoraLayer)


def _tuner_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """Every peft tuner layer of ``model`` (LoRA or another peft method), by name."""
    cls = _tuner_layer_cls()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def _adapter_names(model: nn.Module) -> set[str]:
    """The adapters on ``model``: those its peft layers hold and those its ``peft_config`` names."""
    names: set[str] = set()
    for _, m in _tuner_layers(model):
        names.update(m._all_available_adapter_names())
    cfg = model.__dict__.get("peft_config")
    if isinstance(cfg, Mapping):
        names.update(cfg)
    return names


def bare_view(module: nn.Module) -> nn.Module:
    """``module`` without its peft adapters, sharing every parameter and buffer with it (no copy).

    The teacher of the one-base layout: the base with its adapters disabled, as a module of its own
    (the trajectory's teacher: ``Trajectory.load(folder, bare_view(unet))``, ``DegradationRecorder(
    bare_view(unet), fake_unet, ...)``). Its state dict has the plain layer names (no ``base_layer``,
    no ``lora_``) and holds the base's own parameter and buffer objects, so it costs the module
    structure only and follows in-place changes of the base's weights (``param.data`` swaps by
    ``.to()`` included). Make it once the base is on its device: ``.to()`` replaces buffers by new
    tensors, which a view made earlier would not see. A DDP wrapper is looked through."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    module = _unwrap(module)
    memo: dict[int, Any] = {id(t): t for t in (*module.parameters(), *module.buffers())}
    view = _deepcopy_quietly(module, memo)
    for name, m in reversed(_tuner_layers(view)):  # innermost first
        parent, _, child = name.rpartition(".")
        setattr(view.get_submodule(parent) if parent else view, child, m.get_base_layer())
    view.__dict__.pop("peft_config", None)
    if "_hf_peft_config_loaded" in view.__dict__:
        view._hf_peft_config_loaded = False  # diffusers' flag: the view has no adapters
    view.__dict__.pop("__deepcopy__", None)
    return view


class _TargetCall:
    """``base(*args, **kwargs)`` inside :meth:`SharedBasePath.target`: a drop-in for code that calls a
    teacher module directly (``guidance.real_unet = path.as_target()``). Not an ``nn.Module``, so the
    base's parameters (the generator's adapter among them) never join the caller's ``parameters()``;
    ``config``, ``dtype`` and ``device`` are read from the base."""

    _FORWARDED = ("config", "dtype", "device")

    def __init__(self, path: SharedBasePath, module: Callable[..., Any]):
        self._path, self._module = path, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._path.target():
            return self._module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in _TargetCall._FORWARDED:
            return getattr(self._path.base, name)
        raise AttributeError(
            f"the path's target call has no attribute {name!r}: it only runs the base under path.target() "
            f"(and reads {list(_TargetCall._FORWARDED)}); use path.base for the module itself"
        )


class SharedBasePath:
    """Serve a trajectory's LoRA nodes as a second peft adapter on the user's base; made by
    :func:`attach_adapter` (or directly).

    Args:
        base: the module the generator's peft adapter lives on (a DDP wrapper is looked through; calling
            the wrapper inside :meth:`target` works). Its weights with the adapters disabled must be the
            trajectory's teacher's.
        trajectory: a ``kind="lora"`` path recorded on the teacher (best: on :func:`bare_view` of this
            base, so the trajectory holds no copy of the weights). Its LoRA targets must be layers peft
            can host (``nn.Linear``, ungrouped ``nn.Conv1d/2d/3d``) under the same names in the base.
        schedule: as for :func:`~disback_core.attach.attach`: :class:`~disback_core.schedules.FixedInterval`,
            :class:`~disback_core.schedules.AdaptiveGap`, :class:`~disback_core.schedules.Budgeted`, or
            ``"manual"``; required unless ``start=0``. Interpolating schedules (``LinearPath``) are
            refused: a weighted sum of two nodes is not one rank-r adapter.
        generator_adapter: the generator's adapter name on the base (diffusers' and peft's default
            ``"default"``), checked to exist; ``None`` for a base without one.
        path_adapter: the name of the path's adapter; refused if the base already has an adapter of
            that name.
        fake: the user's fake score, loaded with node N in place: a module (a copy of the base, DMD2's
            ``fake_unet``: same parameter objects, the optimizer keeps working) or the name of a LoRA
            adapter on this base with the path's rank, scale and layers (a LoRA fake score).
        start: the first node (default N-1, as DisBack; 0 = the teacher).
        prefix: where the base sits in the trajectory's teacher (found automatically).
        call: how to run the base on the probe for :meth:`verify` (default the trajectory's convention).
        check_weights: refuse a base whose adapter-free weights are not the trajectory's teacher's.
        adapter_dtype: the path adapter's dtype (default float32, as peft keeps trained adapters beside
            a bf16 base; the nodes are stored in float32).

    Attributes: ``base`` (unwrapped), ``module`` (as given), ``trajectory``, ``adapter`` (the path
    adapter's name), ``layers`` (the base's layer names it is on), ``prefix``, ``cursor``, ``node``,
    ``switches``.
    """

    def __init__(
        self,
        base: nn.Module,
        trajectory: Trajectory,
        schedule: Any = None,
        *,
        generator_adapter: str | None = "default",
        path_adapter: str = PATH_ADAPTER,
        fake: nn.Module | str | None = None,
        start: int | None = None,
        prefix: str | None = None,
        call: Callable[..., Tensor] | None = None,
        check_weights: bool = True,
        adapter_dtype: torch.dtype = torch.float32,
    ):
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be the nn.Module the generator's adapter lives on, got {type(base).__name__}")
        if not isinstance(trajectory, Trajectory):
            raise TypeError(f"trajectory must be a Trajectory, got {type(trajectory).__name__}")
        if call is not None and not callable(call):
            raise TypeError(f"call must be a function fn(module, x, sigma, cond), got {call!r}")
        if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
            raise TypeError(f"adapter_dtype must be a floating torch.dtype, got {adapter_dtype!r}")
        schedule = required_schedule(schedule, start, "SharedBasePath")
        if schedule is not None and callable(getattr(schedule, "position", None)):
            raise ValueError(
                f"{type(schedule).__name__} interpolates between nodes (a weighted sum of two nodes' deltas, rank "
                "2r), which one rank-r adapter cannot hold: use FixedInterval, AdaptiveGap or Budgeted here, or "
                "attach() a copy of the teacher"
            )
        if not isinstance(path_adapter, str) or not _ADAPTER_NAME.fullmatch(path_adapter):
            raise ValueError(f"path_adapter must be 1-64 characters of A-Z, a-z, 0-9, '_', '-', got {path_adapter!r}")
        if trajectory.kind != "lora":
            raise ValueError(
                f"the trajectory's nodes are {trajectory.kind!r} states, not LoRA factors: only a kind='lora' path "
                "(record_degradation(mode='lora' or 'svd')) can be served as an adapter; attach() a copy of the "
                "teacher for full nodes"
            )
        self.module, self.base, self.trajectory, self.call = base, _unwrap(base), trajectory, call
        self.adapter = path_adapter
        self._spec = trajectory._lora_spec()
        self._attached = False
        self._open = 0
        existing = _adapter_names(self.base)
        if path_adapter in existing:
            raise ValueError(
                f"the base already has an adapter named {path_adapter!r} (its adapters: {sorted(existing)}): "
                "pass another path_adapter= name"
            )
        if generator_adapter is not None and generator_adapter not in existing:
            raise ValueError(
                f"the base has no adapter named {generator_adapter!r} (generator_adapter=; its adapters: "
                f"{sorted(existing)}): name the generator's adapter, or pass generator_adapter=None"
            )
        self.generator_adapter = generator_adapter
        if _tuner_layers(trajectory.teacher):
            raise ValueError(
                f"the trajectory's teacher ({type(trajectory.teacher).__name__}) carries peft adapters (was the path "
                "recorded or loaded on the base itself before the generator's adapter was added?): load it on the "
                "adapter-free view of the base, Trajectory.load(folder, bare_view(base)), or record it with "
                "DegradationRecorder(bare_view(base), fake, ...)"
            )
        self._check_not_merged()
        view = bare_view(self.base)
        self.prefix = _prefix(view, trajectory) if prefix is None else prefix
        self.layers = self._host_layers(view)
        if check_weights:
            self._check_weights(view)
        self._shared = self._shares_teacher(view)
        del view
        self._inject(adapter_dtype)
        self._attached = True
        try:
            start = max(trajectory.last - 1, 0) if start is None else start
            trajectory._check_index(start)
            self.cursor = NodeCursor(start, TeacherOnly() if schedule is None else schedule)
            self._loaded = -1
            self._write(start)
            if fake is not None:
                self.load_fake(fake)
        except BaseException:
            self.detach()
            raise

    # ------------------------------------------------------------------ checks

    def _check_not_merged(self) -> None:
        merged = [n for n, m in _tuner_layers(self.base) if m.merged]
        if merged:
            raise ValueError(
                f"the base's peft layer {merged[0]!r} has merged adapters ({len(merged)} layers): the teacher is the "
                "base with its adapters disabled, which a merged adapter is not; unmerge them (unet.unmerge_adapter() "
                "or layer.unmerge()) first"
            )

    def _host_layers(self, view: nn.Module) -> list[str]:
        """The base's layer names for the trajectory's targets, each checked to be one peft LoRA can host
        with the node's factor shapes."""
        traj, spec = self.trajectory, self._spec
        template = traj._template
        lora_cls, tuner_cls = _lora_layer_cls(), _tuner_layer_cls()
        out = []
        for name in node_layers(traj.nodes[0]):
            if not name.startswith(self.prefix):
                raise ValueError(f"the trajectory sets layer {name!r}, which is not under prefix {self.prefix!r}")
            local = name[len(self.prefix) :]
            try:
                layer = view.get_submodule(local)
                host = self.base.get_submodule(local)
            except AttributeError:
                raise ValueError(
                    f"the base ({type(self.base).__name__}) has no layer {local!r}, which the trajectory sets (as "
                    f"{name!r}): the path was recorded with other target names or on another model"
                ) from None
            if isinstance(host, tuner_cls) and not isinstance(host, lora_cls):
                raise ValueError(
                    f"base layer {local!r} carries a {type(host).__name__} adapter (not LoRA), which cannot host "
                    "the path's LoRA adapter beside it"
                )
            if _backend(layer) != "peft":
                raise ValueError(
                    f"the trajectory's target {local!r} is a {type(layer).__name__}, which peft cannot host as a LoRA "
                    "layer (the path was recorded with delta (parametrize) targets: custom or grouped layers): "
                    "attach() a copy of the teacher for such a path, or record it on nn.Linear/nn.Conv layers"
                )
            want = _target(local, layer, spec.rank)
            for key, shape in ((name + _A, want.a_shape), (name + _B, want.b_shape)):
                if tuple(template[key]) != tuple(shape):
                    raise ValueError(
                        f"the trajectory's {key} has shape {tuple(template[key])}, but a rank-{spec.rank} peft LoRA "
                        f"on the base's {local!r} ({type(layer).__name__}) has {tuple(shape)}"
                    )
            out.append(local)
        return out

    def _check_weights(self, view: nn.Module) -> None:
        """The trajectory's teacher is unchanged (:meth:`Trajectory.check_base`) and the base, adapters off,
        holds its weights (compared in the less precise of the two dtypes, as :func:`attach` does)."""
        traj = self.trajectory
        traj.check_base()
        mine = {self.prefix + k: v for k, v in _state(view).items()}
        base = traj.base_tensors()
        if set(mine) <= set(base) and all(mine[k] is base[k] for k in mine):
            return  # the trajectory's teacher is (a view of) this base
        theirs = {k: base[k] for k in mine if k in base}
        dtype = lowest_float_dtype({f"{i}": t for i, t in enumerate([*mine.values(), *theirs.values()])})
        if set(mine) != set(theirs) or tensors_fingerprint(mine, dtype) != tensors_fingerprint(theirs, dtype):
            a, b = lowest_float_dtype(mine), lowest_float_dtype(theirs)
            cast_note = (
                f" (compared in {_name(dtype)}: the base is {_name(a)}, the trajectory's teacher {_name(b)})"
                if a != b
                else ""
            )
            raise ValueError(
                f"the base ({type(self.base).__name__}) with its adapters disabled does not hold the weights of the "
                f"trajectory's teacher (fingerprint){cast_note}: its weights changed since recording, or it is "
                "another model. Load the path on this base's view, Trajectory.load(folder, bare_view(base))"
            )

    def _shares_teacher(self, view: nn.Module) -> bool:
        """Whether the trajectory's teacher holds this base's own tensors (it is a view of the base)."""
        base = _state(self.trajectory.teacher)
        return all(base.get(self.prefix + k) is v for k, v in _state(view).items())

    # ------------------------------------------------------------------ the adapter

    def _inject(self, dtype: torch.dtype) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        base, spec, name = self.base, self._spec, self.adapter
        self._had_config = "peft_config" in base.__dict__
        before = dict(_tuner_layers(base))
        self._state_before = {
            n: (m.__dict__.get("_active_adapter"), m.__dict__.get("_disable_adapters")) for n, m in before.items()
        }
        flags = [(p, p.requires_grad) for p in base.parameters()]
        ref = next(iter(before.values()), None)
        active: Any = ref.active_adapter if ref is not None else []
        disabled = bool(ref.disable_adapters) if ref is not None else False
        cfg = LoraConfig(
            r=spec.rank,
            # peft annotates lora_alpha as int but only divides by it: the spec's float alpha is exact
            lora_alpha=float(spec.alpha if spec.alpha is not None else spec.rank),  # type: ignore[arg-type]
            use_rslora=spec.use_rslora,
            target_modules="(?:" + "|".join(re.escape(n) for n in self.layers) + ")",  # exact names (re.fullmatch)
            lora_dropout=0.0,
            bias="none",
            init_lora_weights=False,
            inference_mode=True,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(cfg, base, adapter_name=name)
        # peft's injection activates the new adapter on every layer and may touch requires_grad: put back
        # each layer's active adapters and enabled flag, and every parameter's flag.
        for p, f in flags:
            p.requires_grad_(f)
        self._wrapped: list[str] = []
        for n, m in _tuner_layers(base):
            if n in before:
                act, dis = self._state_before[n]
                _restore_attr(m, "_active_adapter", act)
                _restore_attr(m, "_disable_adapters", dis)
            else:
                self._wrapped.append(n)
                m._active_adapter = list(active) if isinstance(active, list) else active
                m._disable_adapters = disabled
        hosts = {n for n, m in _tuner_layers(base) if name in m._all_available_adapter_names()}
        if hosts != set(self.layers):
            raise RuntimeError(
                f"peft put the path adapter on {len(hosts)} layers, the trajectory sets {len(self.layers)}: "
                f"e.g. {sorted(hosts ^ set(self.layers))[:3]}"
            )
        self._hosts: list[Any] = [base.get_submodule(n) for n in self.layers]
        self._factors: list[tuple[Tensor, Tensor, str]] = []
        with torch.no_grad():
            for local, m in zip(self.layers, self._hosts):
                m.lora_A[name].to(dtype=dtype).requires_grad_(False)
                m.lora_B[name].to(dtype=dtype).requires_grad_(False)
                m.scaling[name] = spec.scale
                a, b = m.lora_A[name].weight, m.lora_B[name].weight
                a.zero_()
                b.zero_()
                self._factors.append((a, b, self.prefix + local))

    def _check_scaling(self) -> None:
        scale = self._spec.scale
        for local, m in zip(self.layers, self._hosts):
            if m.scaling.get(self.adapter) != scale:
                raise RuntimeError(
                    f"the path adapter's scaling on {local!r} is {m.scaling.get(self.adapter)!r}, the trajectory's "
                    f"LoRA scale is {scale!r}: something rescaled the {self.adapter!r} adapter (set_adapters "
                    "weights, set_scale)"
                )

    def adapter_parameters(self) -> list[Tensor]:
        """The path adapter's factors (one node's LoRA weights; never trainable)."""
        return [t for a, b, _ in self._factors for t in (a, b)]

    def nbytes(self) -> int:
        """Bytes the path adapter takes on the base's device (the nodes themselves stay where the trajectory keeps them)."""
        return sum(t.numel() * t.element_size() for t in self.adapter_parameters())

    # ------------------------------------------------------------------ moving along the path

    @property
    def node(self) -> int:
        return self.cursor.node

    @property
    def switches(self) -> list[tuple[int, int]]:
        return self.cursor.switches

    @property
    def position(self) -> float:
        return self.cursor.position

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this path was detached; make a new SharedBasePath to serve it again")

    def _write(self, k: int) -> None:
        """Load node ``k``'s factors into the path adapter (node 0: nothing to load, no adapter runs)."""
        self._check_attached()
        if self._open:
            raise RuntimeError("the path cannot switch nodes inside `with path.target():`; step after the block")
        if k == 0 or k == self._loaded:
            return
        node = self.trajectory.nodes[k - 1]
        with torch.no_grad():
            for a, b, name in self._factors:
                a.copy_(node[name + _A])
                b.copy_(node[name + _B])
        self._loaded = k

    def step(self, stat: float | None = None) -> bool:
        """Count one generator update (call it after each); move the target one node toward the teacher
        when the schedule says so. ``stat``: the score gap for :class:`AdaptiveGap`. True on a switch."""
        self._check_attached()
        if self._open:
            raise RuntimeError("call path.step() after the `with path.target():` block, not inside it")
        position = self.cursor.step(stat)
        if position is None:
            return False
        self._write(int(position))
        return True

    def set_node(self, k: int) -> None:
        """Serve node ``k`` from now on (0 = the teacher: the base with every adapter disabled)."""
        self.trajectory._check_index(k)
        self._write(k)
        self.cursor.moved(k)

    @contextlib.contextmanager
    def target(self) -> Iterator[nn.Module]:
        """Inside the block the base computes the current node: node ``k``'s adapter alone on every peft layer
        (node 0: every adapter disabled, the bare base). Yields the base; the previous active adapters and
        enabled flags are restored on exit, also on an exception. Never changes ``requires_grad``."""
        self._check_attached()
        self._check_scaling()
        layers = [m for _, m in _tuner_layers(self.base)]
        if any(m.merged for m in layers):
            self._check_not_merged()  # raises, naming the layer
        saved = [(m, m.__dict__.get("_active_adapter"), m.__dict__.get("_disable_adapters")) for m in layers]
        node0 = self.node == 0
        self._open += 1
        try:
            for m in layers:
                if node0:
                    m._disable_adapters = True
                else:
                    m._active_adapter = self.adapter
                    m._disable_adapters = False
            yield self.base
        finally:
            for m, act, dis in saved:
                _restore_attr(m, "_active_adapter", act)
                _restore_attr(m, "_disable_adapters", dis)
            self._open -= 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``path(...)``: the base's own call (as given, e.g. its DDP wrapper) inside :meth:`target`."""
        with self.target():
            return self.module(*args, **kwargs)

    def as_target(self) -> Callable[..., Any]:
        """A callable that runs the base (as given, e.g. its DDP wrapper) inside :meth:`target`: for code that
        calls its teacher module directly. Not an ``nn.Module`` (the base's parameters stay out of the
        caller's ``parameters()``)."""
        self._check_attached()
        return _TargetCall(self, self.module)

    def load_fake(self, fake: nn.Module | str) -> None:
        """Load node N into the fake score in place: a copy of the base (a module, e.g. DMD2's ``fake_unet``;
        a finer-dtype copy keeps its own weights under the node, as :meth:`Attachment.load_fake`), or the name
        of a LoRA adapter on this base on the path's layers with its rank and scale (a LoRA fake score)."""
        traj = self.trajectory
        if isinstance(fake, str):
            self._load_fake_adapter(fake)
            return
        if not isinstance(fake, nn.Module):
            raise TypeError(f"fake must be a module or an adapter name on the base, got {type(fake).__name__}")
        fake = _unwrap(fake)
        if fake is self.base:
            raise ValueError("fake is the base itself: pass a copy of the base, or the name of a LoRA adapter on it")
        if _tuner_layers(fake):
            raise ValueError(
                "the fake score module carries peft adapters: pass a plain copy of the base (made before the "
                "generator's adapter was added), or the fake's adapter name"
            )
        own = {self.prefix + k: v for k, v in _state(fake).items()}
        finer = _finer_copy(own, traj.base_tensors())
        traj.load_into(fake, traj.last, prefix=self.prefix, base=finer)

    def _load_fake_adapter(self, name: str) -> None:
        if name == self.adapter:
            raise ValueError(f"{name!r} is the path's own adapter, not a fake score")
        hosts = {n for n, m in _tuner_layers(self.base) if name in m._all_available_adapter_names()}
        if not hosts:
            raise ValueError(f"the base has no adapter named {name!r} for the fake score")
        if hosts != set(self.layers):
            extra, missing = sorted(hosts - set(self.layers)), sorted(set(self.layers) - hosts)
            raise ValueError(
                f"the fake adapter {name!r} must be on exactly the path's {len(self.layers)} layers to start at node "
                f"N: it is also on {extra[:3]}, and not on {missing[:3]}; make it with the path's targets "
                "(LoraConfig(target_modules=path.layers, r=..., lora_alpha=...))"
            )
        node = self.trajectory.nodes[self.trajectory.last - 1]
        scale = self._spec.scale
        with torch.no_grad():
            for local, m in zip(self.layers, self._hosts):
                if m.scaling.get(name) != scale or name not in m.lora_A:
                    raise ValueError(
                        f"the fake adapter {name!r} on {local!r} has scaling {m.scaling.get(name)!r}, the path's is "
                        f"{scale!r}: give it the path's rank ({self._spec.rank}) and alpha"
                    )
                for dst, key in ((m.lora_A[name].weight, _A), (m.lora_B[name].weight, _B)):
                    src = node[self.prefix + local + key]
                    if tuple(dst.shape) != tuple(src.shape):
                        raise ValueError(
                            f"the fake adapter {name!r} on {local!r} has {key[1:]} of shape {tuple(dst.shape)}, the "
                            f"path's node has {tuple(src.shape)}: give it the path's rank ({self._spec.rank})"
                        )
                    dst.copy_(src)

    # ------------------------------------------------------------------ checks on the running module

    def _probed(self) -> tuple[Any, Callable[..., Tensor], contextlib.AbstractContextManager[Any]]:
        """(module to run, call, context that puts the base in place) for the probe: the base with the
        trajectory's convention, or, for a base inside the trajectory's teacher wrapper (a view of it, e.g.
        ``DiffusersDenoiser(bare_view(unet))``), that wrapper with the base swapped in for the view."""
        traj = self.trajectory
        if not self.prefix or self.call is not None:
            return self.base, traj.probe_runner(self.call), contextlib.nullcontext()
        if not self._shared:
            raise ValueError(
                f"the probe was recorded on the trajectory's teacher ({type(traj.teacher).__name__}) in its units, "
                f"and this base is a separate copy of its submodule {self.prefix[:-1]!r}: load the path on "
                "bare_view(base) inside the wrapper, or pass call=fn that runs the base on the probe"
            )
        inner = traj.teacher.get_submodule(self.prefix[:-1])
        return traj.teacher, traj.probe_runner(), _swapped(traj.teacher, self.prefix[:-1], inner, self.base)

    def _base_dtype(self) -> torch.dtype | None:
        """The lowest floating dtype of the base's own tensors (its adapters left out)."""
        return lowest_float_dtype({k: v for k, v in _state(self.base).items() if ".lora_" not in k})

    def verify(self, node: int | None = None) -> float:
        """Max abs difference between the base's output inside :meth:`target` on the trajectory's probe and
        node ``node``'s recorded one (default: the node it serves). A base held in another precision than the
        recorded outputs' is compared with node k's weights written in its own dtypes into a private copy of
        the base (``node_references``: a temporary full copy), as ``Attachment.verify`` does."""
        traj = self.trajectory
        if traj.probe is None:
            raise ValueError("the trajectory has no probe to verify against")
        k = self.node if node is None else node
        traj._check_index(k)
        module, fn, ctx = self._probed()
        with ctx, self.target():
            out = probe_output(module, traj.probe, fn)
        if traj.probe_dtype is None or self._base_dtype() == traj.probe_dtype:
            return _max_error(out, traj.probe.outputs[k])
        ref_module = traj.teacher if module is traj.teacher else bare_view(self.base)
        prefix = "" if module is traj.teacher else self.prefix
        return _max_error(out, node_references(traj, ref_module, [k], fn, prefix=prefix)[k])

    # ------------------------------------------------------------------ checkpoint, detach

    def state_dict(self) -> dict[str, Any]:
        """The schedule state (the node, counters, switches); the nodes are the trajectory's."""
        return self.cursor.state_dict()

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self._check_attached()
        k = int(d["node"])
        self.trajectory._check_index(k)
        position = float(d.get("position", k))
        if position != k:
            raise ValueError(f"state at position {position}: a shared-base path serves whole nodes only")
        self.cursor.load_state_dict(dict(d))
        self._write(k)

    def detach(self) -> None:
        """Remove the path adapter: the base's modules, state dict, peft config, active adapters and flags are
        as before it was added (a second call does nothing)."""
        if not self._attached:
            return
        if self._open:
            raise RuntimeError("detach() inside `with path.target():`; detach after the block")
        base, name = self.base, self.adapter
        wrapped = set(self._wrapped)
        for n, m in reversed(_tuner_layers(base)):
            if name not in m._all_available_adapter_names():
                continue
            if n in wrapped and m._all_available_adapter_names() == [name]:
                parent, _, child = n.rpartition(".")
                setattr(base.get_submodule(parent) if parent else base, child, m.get_base_layer())
            else:
                act = m.__dict__.get("_active_adapter")
                m.delete_adapter(name)
                _restore_attr(m, "_active_adapter", act)
        cfg = base.__dict__.get("peft_config")
        if isinstance(cfg, dict):
            cfg.pop(name, None)
            if not self._had_config and not cfg:
                del base.__dict__["peft_config"]
        self._hosts, self._factors = [], []
        self._attached = False

    def __enter__(self) -> SharedBasePath:
        raise TypeError(
            "use `with path.target():` around the teacher's call (the path itself is not a context manager; "
            "path.detach() removes it)"
        )

    def __exit__(self, *exc: Any) -> None:  # pragma: no cover - __enter__ always raises
        return None


def _restore_attr(m: nn.Module, attr: str, value: Any) -> None:
    """Put an instance attribute back as it was (``None``: the class default, i.e. no instance attribute)."""
    if value is None:
        m.__dict__.pop(attr, None)
    else:
        object.__setattr__(m, attr, value)


@contextlib.contextmanager
def _swapped(root: nn.Module, name: str, old: nn.Module, new: nn.Module) -> Iterator[None]:
    """``root.<name>`` is ``new`` inside the block, ``old`` again after it."""
    parent, _, child = name.rpartition(".")
    holder = root.get_submodule(parent) if parent else root
    setattr(holder, child, new)
    try:
        yield
    finally:
        setattr(holder, child, old)


def attach_adapter(
    base: nn.Module,
    trajectory: Trajectory,
    schedule: Any = None,  # required unless start=0, as for attach
    *,
    generator_adapter: str | None = "default",
    path_adapter: str = PATH_ADAPTER,
    fake: nn.Module | str | None = None,
    start: int | None = None,
    prefix: str | None = None,
    call: Callable[..., Tensor] | None = None,
    check_weights: bool = True,
    adapter_dtype: torch.dtype = torch.float32,
) -> SharedBasePath:
    """Serve ``trajectory`` as a second peft adapter on ``base``, the module the generator's adapter lives on
    (see :class:`SharedBasePath`): the one-base analogue of :func:`~disback_core.attach.attach`."""
    return SharedBasePath(
        base,
        trajectory,
        schedule,
        generator_adapter=generator_adapter,
        path_adapter=path_adapter,
        fake=fake,
        start=start,
        prefix=prefix,
        call=call,
        check_weights=check_weights,
        adapter_dtype=adapter_dtype,
    )
