"""Launch configuration of the Triton kernels: one typed, validated object (`CONFIG`).

The defaults are what the sweeps in `benchmarks/bench_kernels.py` chose (docs/kernel_design.md section 6 says what
each knob trades). `VLONGHORN_KERNEL_CONFIG` (a JSON object) overrides them when the package is imported; an
unknown key, a value of the wrong type or a combination the kernels cannot launch is an error that names it.

    from vlonghorn.kernels import CONFIG
    CONFIG.forward_bd                      # read
    CONFIG.update(forward_bd=128)          # validated as a whole; nothing changes on an error
    with CONFIG.override(recon=False):     # restored on exit
        ...

Under torch.compile the ops read the configuration where the graph is traced, so a change after compiling
recompiles (the values are guarded) instead of running with stale buffer shapes.
"""
import contextlib
import dataclasses
import difflib
import json
import os

__all__ = ["KernelConfig", "CONFIG", "ENV_VAR"]

ENV_VAR = "VLONGHORN_KERNEL_CONFIG"


def _pow2(v):
    return v > 0 and v & (v - 1) == 0


@dataclasses.dataclass
class KernelConfig:
    """Launch parameters. BD: channels per program; warps: warps per program (32 lanes each)."""

    # forward pass: BD channels per program over `forward_warps` warps (1, 2 or 4 channels per thread); L1
    # prefetch of the next step's per-token records (GPU only)
    forward_bd: int = 64
    forward_warps: int = 1
    forward_prefetch: bool = True
    # backward pass: one channel per thread (backward_bd = 32 x backward_warps); steps per register tile; steps
    # between the forward's fp32 checkpoints (the backward's window; a multiple of backward_tile)
    backward_bd: int = 32
    backward_warps: int = 1
    backward_tile: int = 2
    checkpoint_every: int = 64
    # conv1d + SiLU: channels per program, warps, tokens per program
    conv_bd: int = 128
    conv_warps: int = 1
    conv_chunk: int = 64
    # fused residual add + RMSNorm: elements per program (norm_elems / the row width rounded up to a power of two
    # rows, at least one) and warps; the backward runs norm_backward_per_sm programs per SM, each summing the
    # weight-gradient partial of its range of rows
    norm_elems: int = 4096
    norm_warps: int = 4
    norm_backward_per_sm: int = 4
    # chunked (two-level) forward for too few programs to fill the GPU. chunk_len: tokens per chunk (0: chosen
    # per call: chunk only if batch x channel blocks x chunk_split <= SMs x the forward's resident programs per SM,
    # into about chunk_waves x that many programs of at least chunk_min tokens). chunk_bd / chunk_warps: the
    # launch of the chunk summaries (chunk_bd divides forward_bd).
    chunk_len: int = 0
    chunk_split: int = 3
    chunk_waves: int = 2
    chunk_min: int = 256
    chunk_bd: int = 64
    chunk_warps: int = 1
    # segmented backward, the same idea over checkpoint windows: segment_windows per segment (0: chosen per call,
    # segments only if the backward's programs <= segment_cap x SMs x its resident programs per SM)
    segment_windows: int = 0
    segment_cap: float = 1.0
    segment_waves: int = 8
    segment_min: int = 4
    # recompute regions (training with recompute_mixer): keep the gated output of a two-direction scan with a gate
    # for the backward (True), or keep only y_pre, the gate's input, and rebuild the output from it and the
    # recomputed z there (False: one (B, L, E) tensor less per block between forward and backward, one elementwise
    # pass more in the backward; the rebuilt output rounds y_pre before the gate, the kernel after it)
    keep_gated_output: bool = True
    # reconstructing backward for bf16 / fp16 inputs: relative drift tolerance at each checkpoint, a register cap
    # for its launch (0: none); it steps aside while the running share of redone programs (per device, weight
    # recon_decay per call) is at or above recon_share, except on every recon_probe-th call
    recon: bool = True
    recon_tol: float = 1e-4
    recon_maxnreg: int = 168
    recon_share: float = 0.4
    recon_probe: int = 64
    recon_decay: float = 0.05

    def __post_init__(self):
        self.validate()
        object.__setattr__(self, "_ready", True)

    # -- access -------------------------------------------------------------------------------------------------
    def __getitem__(self, key):
        self._check_keys([key])
        return getattr(self, key)

    def __setitem__(self, key, value):
        self.update({key: value})

    def as_dict(self):
        return dataclasses.asdict(self)

    def update(self, values=None, **kw):
        """Set several values at once; the result is validated as a whole (nothing changes if it fails)."""
        values = dict(values or {}, **kw)
        self._check_keys(values)
        candidate = dataclasses.replace(self, **{k: self._coerce(k, v) for k, v in values.items()})
        for key, value in dataclasses.asdict(candidate).items():
            object.__setattr__(self, key, value)

    @contextlib.contextmanager
    def override(self, **kw):
        """Apply `kw` for the duration of a with-block."""
        saved = self.as_dict()
        self.update(kw)
        try:
            yield self
        finally:
            self.update(saved)

    def __setattr__(self, key, value):
        if self.__dict__.get("_ready"):     # after __init__: every assignment is validated
            self.update({key: value})
        else:
            object.__setattr__(self, key, value)

    # -- checks -------------------------------------------------------------------------------------------------
    @classmethod
    def _check_keys(cls, keys):
        names = [f.name for f in dataclasses.fields(cls)]
        for key in keys:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise KeyError(f"unknown kernel configuration key {key!r}{hint}; known keys: {', '.join(names)}")

    @classmethod
    def _coerce(cls, key, value):
        kind = {f.name: f.type for f in dataclasses.fields(cls)}[key]
        kind = {"int": int, "float": float, "bool": bool}.get(kind, kind)
        # bool is a subclass of int in Python: a flag is never a number here, nor a number a flag
        accepted = {bool: (bool,), int: (int,), float: (int, float)}[kind]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
            raise TypeError(f"kernel configuration {key!r} must be {kind.__name__}, got {value!r}")
        return kind(value)

    def validate(self):
        for f in dataclasses.fields(self):
            self._coerce(f.name, getattr(self, f.name))

        def need(cond, what):
            if not cond:
                raise ValueError(f"kernel configuration: {what} (got {self.as_dict()})")

        for name in ("forward", "chunk"):
            bd, warps = getattr(self, f"{name}_bd"), getattr(self, f"{name}_warps")
            need(_pow2(warps) and warps <= 8, f"{name}_warps must be 1, 2, 4 or 8")
            need(bd in (32 * warps, 64 * warps, 128 * warps),
                 f"{name}_bd must be 1, 2 or 4 channels per thread: 32, 64 or 128 x {name}_warps")
        need(_pow2(self.backward_warps) and self.backward_warps <= 8, "backward_warps must be 1, 2, 4 or 8")
        need(self.backward_bd == 32 * self.backward_warps, "backward_bd must be 32 x backward_warps")
        need(1 <= self.backward_tile <= 8, "backward_tile must be 1 to 8 (longer tiles compile for minutes)")
        need(self.checkpoint_every >= 1 and self.checkpoint_every % self.backward_tile == 0,
             "checkpoint_every must be a positive multiple of backward_tile")
        need(_pow2(self.conv_bd) and _pow2(self.conv_warps) and self.conv_bd >= 32 * self.conv_warps,
             "conv_bd and conv_warps must be powers of two with conv_bd >= 32 x conv_warps")
        need(self.conv_chunk >= 1, "conv_chunk must be positive")
        need(_pow2(self.norm_elems) and self.norm_elems <= 65536, "norm_elems must be a power of two <= 65536")
        need(_pow2(self.norm_warps) and self.norm_warps <= 16, "norm_warps must be 1, 2, 4, 8 or 16")
        need(self.norm_backward_per_sm >= 1, "norm_backward_per_sm must be >= 1")
        need(self.chunk_len >= 0 and self.segment_windows >= 0, "chunk_len and segment_windows must be >= 0")
        need(min(self.chunk_split, self.chunk_waves, self.chunk_min, self.segment_waves, self.segment_min) >= 1,
             "chunk_split, chunk_waves, chunk_min, segment_waves and segment_min must be >= 1")
        need(self.segment_cap > 0, "segment_cap must be positive")
        need(self.recon_tol >= 0, "recon_tol must be >= 0 (0 redoes every program exactly)")
        need(self.recon_maxnreg == 0 or 24 <= self.recon_maxnreg <= 255, "recon_maxnreg must be 0 or 24 to 255")
        need(0 < self.recon_decay <= 1, "recon_decay must be in (0, 1]")
        # the call count is kept modulo 1024 in fp32, so the probing period must divide it
        need(_pow2(self.recon_probe) and self.recon_probe <= 1024, "recon_probe must be a power of two <= 1024")


def _from_env():
    config = KernelConfig()
    text = os.environ.get(ENV_VAR)
    if text:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{ENV_VAR} must be a JSON object, got {text!r}: {e}") from e
        if not isinstance(values, dict):
            raise ValueError(f"{ENV_VAR} must be a JSON object, got {text!r}")
        try:
            config.update(values)
        except (KeyError, TypeError, ValueError) as e:
            raise type(e)(f"{ENV_VAR}: {e.args[0]}") from e
    return config


CONFIG = _from_env()
