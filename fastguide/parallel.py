"""Branch-parallel guidance over torch.distributed: every rank evaluates a share of the guidance branches
(cond / uncond / perturbed ...), one collective per step gathers the predictions, and every rank computes the
same fused guided prediction, so every rank holds bitwise the same latents.

    # torchrun --nproc-per-node 2 script.py           (NCCL on GPUs, gloo on CPU)
    import fastguide.parallel as fp
    fp.init_from_env()                                 # the process group from torchrun's environment
    guider = fp.distribute(fastguide.diffusers.ClassifierFreeGuidance(guidance_scale=5.0, adaptive=fastguide.AG()))
    out = pipe(..., guider=guider, generator=torch.Generator().manual_seed(0))   # same call on every rank

`distribute` works on any diffusers guider that runs through the guider protocol (`fastguide.diffusers` twins,
diffusers' own guiders, modular pipelines, `fastguide.lab.pipeline()`): it turns the guider, in place, into a
subclass (same name and module, so save_pretrained is unchanged) that

* in `prepare_inputs` hands this rank only its share of the step's work. The work is the rows of every branch
  batch in branch order (B rows of cond, B of uncond -- or only the rows Adaptive Guidance / the interval still
  guide --, B of the perturbed branch); it is cut into `world` contiguous shares as equal as possible
  (`plan`). With equal branches and branches % ranks == 0 (CFG on 2 ranks) every rank gets whole branches;
  otherwise (PAG's 3 branches on 2 ranks, AG dropping rows, 3 ranks) ranks split rows of a branch instead of
  idling. A rank with no rows (fewer rows than ranks: B = 1) is idle for that step: counted in
  `guider.parallel_report.idle` and warned about once per trajectory, never hidden.
* in `prepare_models` reduces the denoiser's inputs batched like the samples (dim 0 == B, as
  `fastguide.enable` decides: tensors the pipeline passes directly, latents and timesteps) to the share's rows,
  and tells the base guider which branch the call is (`_count_prepared`: PAG perturbs the right call);
* in `__call__` gathers all shares with ONE `all_gather_single` (all_gather_into_tensor) of a byte buffer per
  step -- each rank's slot holds a 512-byte header (status, step, settings fingerprints, shape) and its rows,
  padded to the largest share -- into a preallocated buffer, rebuilds every branch's full prediction, and
  calls the guider's own `forward`: the combine, AG's decisions and APG's momentum are computed identically on
  every rank from identical inputs.

The first step of each trajectory adds one header-only exchange (512 bytes per rank): the prediction shape
(so that a rank that is idle, or fails before its denoiser ran, can still join the step's exchange with the
right size) and the settings check. A trajectory of N steps thus costs N + 1 collectives.

Exactness: each rank runs the denoiser on fewer rows than the single-process batch; a row's prediction
depends on the batch it is computed in only by the backend's batch-size-dependent rounding (measured on the
lab's UNet, CPU fp32: see tests/test_parallel.py and bench/NOTES.md). Ranks are bitwise identical.

Classic pipelines (`fastguide.enable(pipe, ..., parallel=True)`, `RowSplit`): the enabled pipeline's batched
denoiser call ([uncond, cond], or the rows AG / the interval keep) is cut into row shares the same way, each
rank runs its share, one all-gather per call rebuilds the batch's prediction and fastguide's guidance combines
it on every rank. PAG pipelines are refused there (their perturbed attention needs the whole batch).

Failures: an exception on any rank between `prepare_inputs` and the guider call of a step (in the denoiser's
`forward`, in the guider's own checks) is caught, and the rank joins the step's exchange with an error status and its message:
every rank then raises `ParallelError("... rank 1 failed at step 3: RuntimeError: ...")`. A rank that fails
elsewhere (the pipeline's own code) or dies leaves its peers in the collective until the group's timeout
(`init_from_env(timeout=)`) or until gloo/NCCL notices the closed connection; they then raise
`ParallelError` naming the step, and the rank, when it recorded its failure in the store (`guard()`, or the
excepthook `init_from_env` installs). Ranks that disagree on the settings (guider config, steps, timesteps,
batch, the guider's inputs: prompts / labels / latents where they go through the guider -- the seed) raise at
the first step, naming what differs.

Not supported (a clear error on every rank): a guider that needs the denoiser's input (x0-space AG / APG,
ClassifierGuidance) at a guided step with fewer rows than ranks (a rank would be idle without that input).
Not covered by the in-step error channel: an exception raised by someone else's forward pre-hook on the
denoiser (before `forward`): it takes the "fails elsewhere" path.
"""
import datetime
import hashlib
import json
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["ParallelError", "ParallelReport", "RowSplit", "distribute", "undistribute", "init_from_env", "plan",
           "guard",
           "HEADER_BYTES"]

HEADER_BYTES = 512
_MAGIC = 0x6661737467756964  # "fastguid"
_FIELDS = 19  # int64 header fields; the rest of the header is the error text
_TEXT = HEADER_BYTES - 8 * _FIELDS
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_FP_NAMES = ("guider settings", "schedule (num_inference_steps, timestep)", "batch (samples per branch)",
             "guider inputs (prompts / labels / latents passed through the guider: the seed)")
_OK, _ERROR = 0, 1
_STORE_KEY = "fastguide/parallel/failed"


class ParallelError(RuntimeError):
    """A rank of the group failed, left, or disagrees with the others; the message names it."""


@dataclass
class ParallelReport:
    """Per trajectory: steps, collectives, bytes exchanged (sent by this rank into the gather, all ranks
    receive world x that), rows this rank evaluated, and the steps at which some rank was idle."""
    steps: int = 0
    collectives: int = 0
    bytes_sent: int = 0
    rows: int = 0
    idle: list = field(default_factory=list)  # (step, [idle ranks])
    exchange_s: float = 0.0  # wall time inside the collectives (includes waiting for the slowest rank)


# --- process group --------------------------------------------------------------------------------------
def init_from_env(backend=None, timeout=120.0, excepthook=True):
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT; LOCAL_RANK picks the GPU). backend: "nccl" when CUDA is available, else "gloo". timeout
    (seconds) bounds every collective: a rank that died or hangs makes the others raise after it.
    excepthook: an uncaught exception on this rank is recorded in the group's store first, so that the peers'
    error names this rank. Returns (rank, world_size); an already initialised group is kept."""
    if not dist.is_available():
        raise RuntimeError("fastguide.parallel.init_from_env: this torch build has no torch.distributed")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"fastguide.parallel.init_from_env: environment variables {missing} are not set; "
                               f"launch with torchrun (e.g. `torchrun --nproc-per-node 2 script.py`)")
        if not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"fastguide.parallel.init_from_env: timeout must be a positive number of seconds, "
                             f"got {timeout!r}")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout)))
    if excepthook:
        _install_excepthook()
    return dist.get_rank(), dist.get_world_size()


def _record_failure(exc, group=None):
    """Write 'rank r: Type: message' into the group's store (best effort) so the peers' errors name it."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(_STORE_KEY, f"rank {dist.get_rank()}: {type(exc).__name__}: {exc}"[:2000])
    except Exception:  # noqa: BLE001 - the store may be gone with the group; the error itself still propagates
        pass


def _recorded_failure():
    try:
        store = dist.distributed_c10d._get_default_store()
        if store.check([_STORE_KEY]):
            return store.get(_STORE_KEY).decode(errors="replace")
    except Exception:  # noqa: BLE001
        pass
    return None


_hook_installed = False


def _install_excepthook():
    global _hook_installed
    if _hook_installed:
        return
    previous = sys.excepthook

    def hook(tp, value, tb):
        if dist.is_initialized() and not isinstance(value, ParallelError):  # a peer's error keeps the first one
            _record_failure(value)
        previous(tp, value, tb)

    sys.excepthook = hook
    _hook_installed = True


class guard:
    """`with fastguide.parallel.guard(): pipe(...)`: an exception leaving the block is recorded in the group's
    store (and re-raised), so the peers, waiting in a collective, raise naming this rank."""

    def __enter__(self):
        return self

    def __exit__(self, tp, value, tb):
        if value is not None and not isinstance(value, ParallelError) and dist.is_initialized():
            _record_failure(value)
        return False


# --- the plan ---------------------------------------------------------------------------------------------
def plan(sizes, world):
    """Cut the rows of the branches (sizes: rows per branch, in branch order) into `world` contiguous shares,
    the first (total % world) one row larger. Returns per rank a list of (branch, lo, hi) pieces (rows lo:hi
    of that branch). Equal branches with branches % world == 0 give every rank whole branches."""
    total = sum(sizes)
    base, extra = divmod(total, world)
    shares, start = [], 0
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        pieces = []
        for k, s in enumerate(sizes):
            lo, hi = max(start, offsets[k]), min(stop, offsets[k + 1])
            if lo < hi:
                pieces.append((k, lo - offsets[k], hi - offsets[k]))
        shares.append(pieces)
        start = stop
    return shares


# --- helpers ----------------------------------------------------------------------------------------------
def _digest(*parts):
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
        else:
            h.update(repr(p).encode())
    return int.from_bytes(h.digest(), "little", signed=True)


def _tensors(value):
    """The tensors inside a prepare_inputs argument (dict, BlockState, tuples), in a deterministic order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in _tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _batch_size(batch_state):
    """B: the most common dim-0 size among the tensors of the conditional batch (ties: the largest)."""
    sizes = Counter(t.shape[0] for t in _tensors(batch_state) if t.dim() > 0)
    if not sizes:
        raise ValueError("fastguide.parallel: the guider's conditional batch holds no batched tensor, so the "
                         "batch size cannot be read; pass the conditional inputs through the guider")
    return max(sizes.items(), key=lambda kv: (kv[1], kv[0]))[0]


def _sample_arg(args, kwargs):
    x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states", kwargs.get("x")))
    return x if isinstance(x, torch.Tensor) else None


# --- the exchange -----------------------------------------------------------------------------------------
class _Exchange:
    """Per guider: the group, the preallocated byte buffers, and the header codec."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self._send = self._recv = None

    def _buffers(self, slot, device):
        n = slot * self.world
        if self._recv is None or self._recv.numel() < n or self._recv.device != device:
            self._recv = torch.empty(max(n, 2 * HEADER_BYTES * self.world), dtype=torch.uint8, device=device)
            self._send = torch.empty(self._recv.numel() // self.world, dtype=torch.uint8, device=device)
        return self._send[:slot], self._recv[:n]

    @staticmethod
    def header(status, step, fps, nrows=0, dtype=None, row_shape=(), text=""):
        if len(row_shape) > 8:
            raise ValueError(f"fastguide.parallel: predictions with more than 8 dims per row: {row_shape}")
        fields = [_MAGIC, status, step, *fps, nrows, _DTYPES.index(dtype) if dtype is not None else -1,
                  len(row_shape), *row_shape, *([0] * (8 - len(row_shape)))]
        raw = text.encode("utf-8", errors="replace")[:_TEXT]
        fields.append(len(raw))
        out = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        out[:8 * _FIELDS] = torch.tensor(fields, dtype=torch.int64).view(torch.uint8)
        out[8 * _FIELDS:8 * _FIELDS + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else 0
        return out

    @staticmethod
    def parse(raw):
        f = raw[:8 * _FIELDS].view(torch.int64).tolist()
        n = f[9]
        text = bytes(raw[8 * _FIELDS:8 * _FIELDS + f[18]].tolist()).decode("utf-8", errors="replace")
        return dict(magic=f[0], status=f[1], step=f[2], fps=f[3:7], nrows=f[7],
                    dtype=_DTYPES[f[8]] if f[8] >= 0 else None, row_shape=tuple(f[10:10 + n]), text=text)

    def gather(self, payload, slot, device, step, report):
        """All-gather `payload` (header + rows, uint8) in slots of `slot` bytes: ONE collective."""
        send, recv = self._buffers(slot, device)
        send.zero_()
        send[:payload.numel()].copy_(payload)
        t0 = time.perf_counter()
        try:
            _all_gather_single(recv, send, group=self.group)
        except Exception as e:  # noqa: BLE001 - timeout or a peer gone: name what we know
            who = _recorded_failure()
            raise ParallelError(f"fastguide.parallel: rank {self.rank}: the exchange of step {step} failed "
                                f"({type(e).__name__}: {e}); "
                                + (f"{who}" if who else "a peer rank failed outside the guider's step, left the "
                                   "group, or is not running the same call")) from e
        report.exchange_s += time.perf_counter() - t0
        report.collectives += 1
        report.bytes_sent += slot
        return recv.view(self.world, slot)

    def headers(self, slots):
        raw = slots[:, :HEADER_BYTES].cpu()  # one device-to-host copy of the headers
        heads = [self.parse(raw[r]) for r in range(self.world)]
        for r, h in enumerate(heads):
            if h["magic"] != _MAGIC:
                raise ParallelError(f"fastguide.parallel: rank {self.rank}: rank {r} sent no fastguide header "
                                    f"(another collective on the same group is interleaved with the guider's)")
        return heads


def _all_gather_single(out, inp, group=None):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group)


# --- the guider mixin -------------------------------------------------------------------------------------
class _State:
    def __init__(self, group):
        self.ex = _Exchange(group)
        self.report = ParallelReport()
        self.shape = None        # (dtype, row_shape) agreed at the trajectory's first step
        self.step = None
        self.fps = None
        self.local = []          # per local batch: (branch, abs_rows)
        self.shares = None
        self.sizes = None
        self.batch = None
        self.names = None
        self.calls = 0
        self.sample = None
        self.full_of = {}        # id(sliced tensor) -> the full one (a pipeline passing the guider's tensors)
        self.hook = None
        self.forward = None
        self.warned_idle = False

    def device(self, preds):
        if preds:
            return preds[0].device
        backend = dist.get_backend(self.ex.group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def handshake(self, preds, status=_OK, text=""):
        """The first step's header-only exchange: the row shape every rank will use, and the settings."""
        p = self
        q = preds[0] if preds else None
        head = _Exchange.header(status, p.step, p.fps or [0, 0, 0, 0], sum(t.shape[0] for t in preds),
                                q.dtype if q is not None else None, tuple(q.shape[1:]) if q is not None else (), text)
        device = self.device(preds)
        slots = p.ex.gather(head.to(device), HEADER_BYTES, device, p.step, p.report)
        heads = p.ex.headers(slots)
        self.check(heads)
        shapes = {(h["dtype"], h["row_shape"]) for h in heads if h["nrows"] > 0}
        if len(shapes) != 1:
            raise ParallelError(f"fastguide.parallel: ranks predict different row shapes / dtypes at step {p.step}: "
                                f"{[(r, str(h['dtype']), h['row_shape']) for r, h in enumerate(heads)]}")
        p.shape = shapes.pop()

    def check(self, heads):
        p = self
        failed = [(r, h) for r, h in enumerate(heads) if h["status"] != _OK]
        if failed:
            r, h = failed[0]
            raise ParallelError(f"fastguide.parallel: rank {r} failed at step {h['step']}: {h['text']}")
        for i, name in enumerate(_FP_NAMES):
            values = [h["fps"][i] for h in heads]
            if len(set(values)) > 1:
                groups = {}
                for r, v in enumerate(values):
                    groups.setdefault(v, []).append(r)
                raise ParallelError(f"fastguide.parallel: ranks disagree at step {p.step} on the {name}: ranks "
                                    f"{list(groups.values())} differ; every rank must make the same pipeline call "
                                    f"(seed, num_inference_steps, guidance, batch)")

    def exchange(self, preds):
        p = self
        if p.shape is None:
            self.handshake(preds)
        dtype, row_shape = p.shape
        row_bytes = torch.empty((), dtype=dtype).element_size()
        for d in row_shape:
            row_bytes *= d
        for q in preds:
            if q.dtype != dtype or tuple(q.shape[1:]) != row_shape:
                self.fail(ValueError(f"prediction {str(q.dtype)} {tuple(q.shape)} differs from the trajectory's "
                                      f"{str(dtype)} rows of {row_shape}"))
        rows_max = max(sum(hi - lo for _, lo, hi in s) for s in p.shares)
        slot = HEADER_BYTES + rows_max * row_bytes
        device = self.device(preds)
        mine = sum(q.shape[0] for q in preds)
        head = _Exchange.header(_OK, p.step, p.fps, mine, dtype, row_shape)
        if preds:
            body = torch.cat([q.contiguous() for q in preds]).reshape(-1).view(torch.uint8)
            payload = torch.cat([head.to(device), body])
        else:
            payload = head.to(device)
        slots = p.ex.gather(payload, slot, device, p.step, p.report)
        self.check(p.ex.headers(slots))
        pieces = [[] for _ in p.sizes]
        for r, share in enumerate(p.shares):
            off = HEADER_BYTES
            for k, lo, hi in share:
                n = (hi - lo) * row_bytes
                pieces[k].append(slots[r, off:off + n].view(dtype).view(hi - lo, *row_shape))
                off += n
        return [torch.cat(ps) if len(ps) > 1 else ps[0].clone() for ps in pieces]

    def fail(self, exc):
        """Join this step's exchange with an error status so every rank raises naming this one."""
        p = self
        if isinstance(exc, ParallelError) or getattr(p, "failing", False):
            return
        p.failing = True
        text = f"{type(exc).__name__}: {exc}"
        try:
            device = self.device([])
            if p.shape is None:
                head = _Exchange.header(_ERROR, p.step if p.step is not None else -1, [0, 0, 0, 0], text=text)
                p.ex.gather(head.to(device), HEADER_BYTES, device, p.step, p.report)
            elif p.shares is not None:
                dtype, row_shape = p.shape
                row_bytes = torch.empty((), dtype=dtype).element_size()
                for d in row_shape:
                    row_bytes *= d
                rows_max = max(sum(hi - lo for _, lo, hi in s) for s in p.shares)
                head = _Exchange.header(_ERROR, p.step, [0, 0, 0, 0], text=text)
                p.ex.gather(head.to(device), HEADER_BYTES + rows_max * row_bytes, device, p.step, p.report)
            else:
                _record_failure(exc)
        except ParallelError:
            pass
        finally:
            p.failing = False
            p.shape = None  # the trajectory is over: the next one starts with a handshake
        raise ParallelError(f"fastguide.parallel: rank {p.ex.rank} failed at step {p.step}: {text}") from exc


class _BranchParallel:
    """Mixed in front of a guider's class by `distribute` (see the module docstring)."""

    _par = None

    @property
    def parallel_report(self):
        return self._par.report

    # -- protocol ------------------------------------------------------------------------------------
    def set_state(self, step, num_inference_steps, timestep):
        super().set_state(step, num_inference_steps, timestep)
        p = self._par
        if p is None:  # made by guider.new / from_config on the distributed class: single process
            return
        if step == 0 or p.step is None or step <= p.step:
            p.report = ParallelReport()
            p.shape = None
            p.warned_idle = False
        p.step, p.num_steps, p.timestep = step, num_inference_steps, timestep
        p.local, p.calls, p.shares, p.sample = [], 0, None, None
        p.report.steps = step + 1

    def prepare_inputs(self, data):
        batches = super().prepare_inputs(data)
        return batches if self._par is None else self._share(batches)

    def prepare_inputs_from_block_state(self, data, input_fields):
        batches = super().prepare_inputs_from_block_state(data, input_fields)
        return batches if self._par is None else self._share(batches)

    def _share(self, batches):
        p = self._par
        try:
            from .diffusers import _batched_rows
            from diffusers.modular_pipelines.modular_pipeline import BlockState
            skip = getattr(self, "_skip", None)
            batch = len(skip.done) if skip is not None and skip.done is not None else _batch_size(batches[0])
            idx = self._partial() if hasattr(self, "_partial") else None
            rows = [torch.arange(batch) for _ in batches]
            if idx is not None and len(batches) > 1:
                rows[1] = idx  # the unconditional batch of a step where AG switched some samples
            sizes = [len(r) for r in rows]
            shares = plan(sizes, p.ex.world)
            p.batch, p.sizes, p.shares = batch, sizes, shares
            p.names = [getattr(b, self._identifier_key) for b in batches]
            config = {k: v for k, v in dict(self.config).items() if not k.startswith("_")}
            p.fps = [_digest(type(self).__name__, json.dumps(config, sort_keys=True, default=repr),
                             getattr(self, "guidance_scale", None)),
                     _digest(p.num_steps, p.timestep),
                     _digest(batch, sizes),
                     _digest(*_tensors(batches)) if p.shape is None else 0]  # the guider's inputs, every branch
            idle = [r for r, s in enumerate(shares) if not s]
            x0 = getattr(self, "_space", None) == "x0" or (skip is not None and skip.adaptive is not None
                                                           and skip.adaptive.space == "x0")
            needs_sample = getattr(self, "_needs_sample", False) or (x0 and len(sizes) > 1)  # guided rows only
            if idle and needs_sample:  # decided alike on every rank from the plan: all raise here, none hangs
                raise ParallelError(f"fastguide.parallel: step {p.step}: {sum(sizes)} rows for {p.ex.world} ranks "
                                    f"leave ranks {idle} idle, and {type(self).__name__} needs the denoiser's input "
                                    f"on every rank (x0 space / classifier); use a batch of at least "
                                    f"{-(-p.ex.world // len(sizes))} samples or fewer ranks")
            if idle:
                p.report.idle.append((p.step, idle))
                if not p.warned_idle and p.ex.rank == 0:
                    warnings.warn(f"fastguide.parallel: step {p.step}: {sum(sizes)} rows for {p.ex.world} ranks, "
                                  f"ranks {idle} idle (batch {batch}); use a batch of at least "
                                  f"{-(-p.ex.world // len(sizes))} samples to keep every rank busy", stacklevel=3)
                p.warned_idle = True
            local, p.full_of = [], {}
            for k, lo, hi in shares[p.ex.rank]:
                abs_rows = rows[k][lo:hi]
                full = batches[k]
                if hi - lo == batch:
                    local.append(full)
                else:
                    items = {}
                    for name, v in full.as_dict().items():
                        items[name] = _batched_rows(v, batch, abs_rows)
                        if isinstance(v, torch.Tensor) and items[name] is not v:
                            p.full_of[id(items[name])] = v
                    local.append(BlockState(**items))
                p.local.append((k, abs_rows))
                p.report.rows += hi - lo
            return local
        except BaseException as e:
            self._par.fail(e)
            raise

    def prepare_models(self, denoiser):
        p = self._par
        if p is None:
            return super().prepare_models(denoiser)
        if p.calls >= len(p.local):
            raise RuntimeError(f"fastguide.parallel: prepare_models called {p.calls + 1} times at step {p.step}, "
                               f"for {len(p.local)} batches handed to this rank")
        k, abs_rows = p.local[p.calls]
        self._count_prepared = k  # the base guider counts branches: this call is branch k (PAG perturbs k == 2)
        super().prepare_models(denoiser)
        if isinstance(denoiser, torch.nn.Module):
            batch = p.batch

            def share_only(module, args, kwargs):
                x = _sample_arg(args, kwargs)
                if x is not None and p.sample is None:
                    full = x if x.shape[0] == batch else p.full_of.get(id(x))
                    if full is not None and full.shape[0] == batch:
                        p.sample = full
                if len(abs_rows) == batch:
                    return None
                from .diffusers import _batched_rows
                return _batched_rows(args, batch, abs_rows), _batched_rows(kwargs, batch, abs_rows)

            p.hook = denoiser.register_forward_pre_hook(share_only, with_kwargs=True)
            # an error inside the denoiser reaches the peers through this step's exchange
            own = denoiser.__dict__.get("forward")
            inner = denoiser.forward

            def forward(*args, **kwargs):
                try:
                    return inner(*args, **kwargs)
                except BaseException as e:
                    self._restore(denoiser)
                    try:
                        super(_BranchParallel, self).cleanup_models(denoiser)
                    except Exception:  # noqa: BLE001 - the original error is the one to report
                        pass
                    self._par.fail(e)
                    raise

            p.forward = (denoiser, own)
            denoiser.forward = forward

    def _restore(self, denoiser):
        p = self._par
        if p.hook is not None:
            p.hook.remove()
            p.hook = None
        if p.forward is not None and p.forward[0] is denoiser:
            own = p.forward[1]
            if own is None:
                denoiser.__dict__.pop("forward", None)
            else:
                denoiser.forward = own
            p.forward = None

    def cleanup_models(self, denoiser):
        if self._par is None:
            return super().cleanup_models(denoiser)
        self._restore(denoiser)
        super().cleanup_models(denoiser)
        self._par.calls += 1

    def __call__(self, data):
        p = self._par
        if p is None:
            return super().__call__(data)
        try:
            if len(data) != len(p.local):
                raise ValueError(f"fastguide.parallel: rank {p.ex.rank} got {len(data)} predicted batches at step "
                                 f"{p.step}, handed out {len(p.local)}")
            preds = []
            for b, (k, abs_rows) in zip(data, p.local):
                pred = getattr(b, "noise_pred", None)
                if not isinstance(pred, torch.Tensor) or pred.shape[0] != len(abs_rows):
                    raise ValueError(f"fastguide.parallel: branch {p.names[k]} at step {p.step} should predict "
                                     f"{len(abs_rows)} rows on rank {p.ex.rank}, got "
                                     f"{None if not isinstance(pred, torch.Tensor) else tuple(pred.shape)}; run the "
                                     f"denoiser between guider.prepare_models / cleanup_models")
                preds.append(pred)
            if preds and len({(q.dtype, q.shape[1:], q.device) for q in preds}) > 1:
                raise ValueError(f"fastguide.parallel: the branch predictions differ in dtype / shape / device: "
                                 f"{[(q.dtype, tuple(q.shape), str(q.device)) for q in preds]}")
        except BaseException as e:
            self._par.fail(e)
            raise
        full = p.exchange(preds)
        if p.sample is not None and hasattr(self, "_sample"):
            self._sample = p.sample
        return self.forward(**dict(zip(p.names, full)))

class RowSplit:
    """The classic route (`fastguide.enable(pipe, ..., parallel=True)`): the enabled pipeline's batched denoiser
    call ([uncond, cond], or the rows AG / the interval keep) is cut into `world` contiguous row shares; each
    rank runs its share and ONE all-gather per call rebuilds the full prediction on every rank, which the
    guidance then combines identically everywhere. The first call with a new input shape adds the header
    exchange (the output's row shape: a rank that is idle or fails must still join with the right size)."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("fastguide.enable(parallel=...): no process group; call "
                               "fastguide.parallel.init_from_env() (under torchrun) first")
        self.state = _State(group)
        self.shapes = {}     # (input row shape, dtype) -> the output's (dtype, row shape)
        self.template = None  # the last output, for an idle rank to return the gathered prediction in

    @property
    def report(self):
        return self.state.report

    def wrap(self, forward, guidance):
        """`forward` (the denoiser) as a function that runs this rank's rows and gathers all of them.
        guidance: the enabled pipeline's `_Guidance` (step, settings) for the settings check."""
        from .pipelines import _prediction, _with_prediction
        from .diffusers import _batched_rows
        p = self.state

        def run(*args, **kwargs):
            x = _sample_arg(args, kwargs)
            if x is None:
                raise ValueError("fastguide.enable(parallel=...): the denoiser call has no sample tensor (first "
                                 "positional argument, sample= or hidden_states=)")
            n = x.shape[0]
            step = guidance.step
            if step <= 0 and (p.step is None or p.step > 0 or step < 0):
                p.report = ParallelReport()
            p.step = step
            p.report.steps = step + 1
            p.sizes, p.shares = [n], plan([n], p.ex.world)
            key = (tuple(x.shape[1:]), x.dtype)  # the output rows follow the input rows, whatever their number
            p.shape = self.shapes.get(key)
            p.fps = [_digest(type(guidance.pipe).__name__, guidance.guidance, sorted(guidance.params.items())),
                     _digest(step, guidance.last_t), _digest(n),
                     _digest(*_tensors([list(args), kwargs])) if step == 0 else 0]
            pieces = p.shares[p.ex.rank]
            if not pieces:
                p.report.idle.append((step, [r for r, sh in enumerate(p.shares) if not sh]))
            out, preds = None, []
            if pieces:
                _, lo, hi = pieces[0]
                rows = torch.arange(lo, hi)
                try:
                    out = forward(*_batched_rows(args, n, rows), **_batched_rows(kwargs, n, rows))
                except BaseException as e:
                    p.fail(e)
                    raise
                preds = [_prediction(out)]
                p.report.rows += hi - lo
            full = p.exchange(preds)[0]
            self.shapes[key] = p.shape
            if out is None:
                if self.template is None:
                    raise ParallelError(f"fastguide.parallel: rank {p.ex.rank} is idle at step {step} ({n} rows for "
                                        f"{p.ex.world} ranks) before any call gave it an output to fill")
                out = self.template
            self.template = out
            return _with_prediction(out, full)

        return run


_CLASSES = {}


def distribute(guider, group=None):
    """Make `guider` (a diffusers guider) branch-parallel over `group` (default: the default process group,
    see `init_from_env`), in place; returns it. Every rank must call the pipeline the same way (same seed,
    steps, guidance); `undistribute(guider)` turns it back."""
    from diffusers.guiders.guider_utils import BaseGuidance
    if not isinstance(guider, BaseGuidance):
        raise TypeError(f"fastguide.parallel.distribute: guider must be a diffusers guider (BaseGuidance), got "
                        f"{type(guider).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastguide.parallel.distribute: no process group; call fastguide.parallel.init_from_env() "
                           "(under torchrun) or torch.distributed.init_process_group first")
    if isinstance(guider, _BranchParallel):
        guider._par = _State(group)
        return guider
    base = type(guider)
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (_BranchParallel, base), {"__module__": base.__module__,
                                                              "__qualname__": base.__qualname__,
                                                              "__doc__": base.__doc__})
        _CLASSES[base] = cls
    guider.__class__ = cls
    guider._par = _State(group)
    return guider


def _base(cls):
    return next(c for c in cls.__mro__[1:] if c is not _BranchParallel and not issubclass(c, _BranchParallel))


def undistribute(guider):
    """The guider back to its own class (single process)."""
    if isinstance(guider, _BranchParallel):
        guider.__class__ = _base(type(guider))
        guider.__dict__.pop("_par", None)
    return guider
