"""Which execution provider runs a bundle, with which session options, and a cache of optimized graphs.

Provider rules (documented once here; `Model.load` follows them):
- "auto" takes the first of CUDA, DirectML, CPU that onnxruntime offers *and that can run the
  bundle*; it never warns about providers the user did not ask for, except when the bundle was
  built for a provider that is missing (e.g. a cuda bundle on a CPU-only onnxruntime).
- An explicit provider that is not available, or that cannot run this bundle, falls back to CPU
  with a warning that says why. The one case that cannot run: an fp32 in-place (GroupQueryAttention)
  bundle on CUDA, whose GQA kernel is fp16/bf16 only; ORT would place GQA on the CPU and copy the
  whole KV cache across PCIe every step, so gptedge runs the bundle on CPU instead and says so.
- A provider whose session fails to start (missing CUDA libraries...) is detected after the session
  is built (onnxruntime silently drops it) and reported the same way.

Optimized-graph cache: the first load of a bundle runs onnxruntime's graph optimizer and saves the
result (at the EXTENDED level: ALL adds hardware-specific layouts that must not be baked into a file)
under the user cache folder, keyed by the bundle's checksums, the onnxruntime version and the
provider. Later loads read the saved graph with optimizations off, because the work is already done.
Weights of the saved graph go to an external file next to it
(`session.optimized_model_external_initializers_file_name`), so models over 2 GB still save.
Any failure of the cache (unwritable folder, corrupt entry) only costs speed, never correctness.
The cache is bounded: after an entry is written, the least recently used ones are removed until the
folder holds at most $GPTEDGE_CACHE_MAX_MB (default 2048); 0 turns the cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from gptedge.errors import BundleError, ProviderError, UsageError
from gptedge.runtime.bundle import DTYPES, BundleSpec
from gptedge.runtime.onnx_scan import scan_model
from gptedge.runtime.traits import AUTO_ORDER, PROVIDER_NAMES, TRAITS, quantization_kind

log = logging.getLogger("gptedge.runtime")

PROVIDERS = ("auto", *PROVIDER_NAMES)
CACHE_VERSION = "1"  # bump when the cached files' layout changes
DEFAULT_CACHE_MAX_MB = 2048  # a few bundles' optimized graphs; GPT-2-124M fp32 takes ~0.5 GB


@dataclass(frozen=True)
class ProviderChoice:
    name: str  # "cpu" | "cuda" | "dml"
    device: str  # where the KV buffers live: "cpu", "cuda" or "dml"
    serialize_runs: bool  # DirectML: one Run at a time per session
    reason: str = ""  # why this differs from what was asked, "" when it does not

    @property
    def ort_providers(self) -> list[str]:
        return [TRAITS[self.name].ort_name] + ([] if self.name == "cpu" else [TRAITS["cpu"].ort_name])


def incompatibility(name: str, spec: BundleSpec) -> str | None:
    """Why provider `name` cannot run this bundle well, or None when it can."""
    t = TRAITS[name]
    if spec.kv_cache.dtype not in DTYPES:  # a quantized cache (bundle.KV_DTYPES)
        if spec.kv_cache.dtype not in t.quantized_kv:
            return (f"this bundle's KV cache is {spec.kv_cache.dtype}, which gptedge has verified on "
                    f"{' / '.join(n for n, r in TRAITS.items() if spec.kv_cache.dtype in r.quantized_kv)} only; "
                    f"quantize the float bundle again without --kv-cache to run it on {name}")
    elif spec.kv_cache.update == "inplace" and spec.kv_cache.dtype not in t.gqa_dtypes:
        return (
            f"onnxruntime's {t.ort_name} GroupQueryAttention runs {' / '.join(t.gqa_dtypes)} only and this bundle's KV "
            f"cache is {spec.kv_cache.dtype} (built for target {spec.target}); export with --target {name} to run there"
        )
    kind = quantization_kind(spec.quantization)
    missing = t.int8_kernels.get(kind) if kind else None
    if missing:
        return f"{missing}; quantize with a weight-only recipe for {name}"
    return None


def choose_provider(requested: str, spec: BundleSpec, available: list[str] | None = None) -> ProviderChoice:
    """Resolve `requested` ("auto", "cpu", "cuda", "dml") against what onnxruntime offers and what the bundle needs."""
    if requested not in PROVIDERS:
        raise UsageError(f"unknown provider {requested!r}; choose one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers() if available is None else available
    offered = [name for name, t in TRAITS.items() if t.ort_name in available]
    if requested == "auto":
        for name in AUTO_ORDER:
            if name in offered and incompatibility(name, spec) is None:
                return _choice(name)
        if spec.target != "cpu" and spec.target not in offered:
            t = TRAITS[spec.target]
            return _fallback(f"the bundle was built for {spec.target} but onnxruntime offers no {t.ort_name} "
                             f"({t.install_hint}); running on CPU")
        return _choice("cpu")
    if requested != "cpu" and requested not in offered:
        return _fallback(f"provider {requested!r} is not available in this onnxruntime ({', '.join(available)}); "
                         f"{TRAITS[requested].install_hint}; running on CPU")
    why = incompatibility(requested, spec)
    if why:
        return _fallback(f"provider {requested!r} cannot run this bundle: {why}; running on CPU")
    if requested == "cpu" and spec.dtype == "fp16":
        _warn(f"this bundle is fp16 (built for {spec.target}); "
              "on CPU it runs slower than an fp32 export (--target cpu)")
    return _choice(requested)


def _choice(name: str, reason: str = "") -> ProviderChoice:
    t = TRAITS[name]
    return ProviderChoice(name=name, device=t.kv_device, serialize_runs=t.serialize_runs, reason=reason)


def _fallback(reason: str) -> ProviderChoice:
    _warn(reason)
    return _choice("cpu", reason)


def _warn(message: str) -> None:
    """A RuntimeWarning attributed to the caller's line (the first frame outside gptedge.runtime)."""
    here, level = Path(__file__).resolve().parent, 2
    frame = sys._getframe(1)
    while frame is not None and Path(frame.f_code.co_filename).resolve().parent == here:
        frame, level = frame.f_back, level + 1
    warnings.warn(f"gptedge: {message}", RuntimeWarning, stacklevel=level)


def physical_cores() -> int | None:
    """Physical cores this process may run on (Linux), or None to let onnxruntime decide (it uses physical cores)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text(encoding="ascii").strip(),
                       (topo / "core_id").read_text(encoding="ascii").strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


# How long an idle intra-op thread spins before it sleeps, by default (onnxruntime's
# session.intra_op.spin_duration_us). Three policies measured on the real SmolLM2-135M bundles, idle and next to one
# busy process (benchmarks/results/runtime-choices.json, "spin"): threads that sleep at once pay a wake-up on every
# operator of every step; threads that spin until the next step (onnxruntime's and llama.cpp's default) decode
# fastest on idle cores and much slower on shared ones; a spin as long as the gap between two operators keeps most
# of the first gain and loses none of the second, so it is the default. True / False (--spin / --no-spin,
# $GPTEDGE_SPIN=1 / 0) choose the other two.
BRIEF_SPIN_US = 5


def spin_default() -> bool | None:
    """$GPTEDGE_SPIN: 1/true/yes/on spins until the next step, 0/false/no/off sleeps at once; otherwise None
    (the brief spin)."""
    value = os.environ.get("GPTEDGE_SPIN", "").strip().lower()
    return True if value in ("1", "true", "yes", "on") else False if value in ("0", "false", "no", "off") else None


def spin_entries(spin: bool | None) -> dict[str, str]:
    """onnxruntime's session config for a spin policy: True spins until the next step, False sleeps at once,
    None spins BRIEF_SPIN_US first."""
    if spin is None:
        return {"session.intra_op.allow_spinning": "1", "session.intra_op.spin_duration_us": str(BRIEF_SPIN_US)}
    return {"session.intra_op.allow_spinning": "1" if spin else "0"}


# One intra-op thread for models this small: their decode step is mostly per-operator overhead, and handing each
# small operator to a second thread costs more than it saves, while a GPT-2-124M-shape bundle gains from a second
# thread (benchmarks/results/runtime-choices.json, decode_by_threads). Where between the two sizes the crossover
# lies is not measured: this bound stays on the side measured to favour one thread.
SINGLE_THREAD_MAX_BYTES = 16 << 20


def default_threads(model_path: Path) -> int | None:
    """Intra-op threads when the caller gives none: 1 for a model under SINGLE_THREAD_MAX_BYTES (graph plus
    external weights), else the physical cores (None: onnxruntime's own choice)."""
    weights = sum(p.stat().st_size for p in model_path.parent.glob(f"{model_path.name}*") if p.is_file())
    return 1 if weights < SINGLE_THREAD_MAX_BYTES else physical_cores()


def session_options(choice: ProviderChoice, threads: int | None, spin: bool | None = None) -> ort.SessionOptions:
    """Options tuned for one-token-at-a-time decoding: sequential, intra-op threads = physical cores."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise UsageError(f"threads must be an integer >= 1 (or None for the physical core count), got {threads!r}",
                         field="threads")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or physical_cores() or 0
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise to a user
    for key, value in spin_entries(spin).items():  # the brief spin unless told (BRIEF_SPIN_US says why)
        so.add_session_config_entry(key, value)
    so.enable_mem_pattern = TRAITS[choice.name].memory_pattern
    return so


# -- the optimized-graph cache ------------------------------------------------------------------------
def cache_root() -> Path:
    """$GPTEDGE_CACHE, else the platform's user cache folder + gptedge."""
    if os.environ.get("GPTEDGE_CACHE"):
        return Path(os.environ["GPTEDGE_CACHE"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "gptedge"


def cache_limit_bytes() -> int:
    """$GPTEDGE_CACHE_MAX_MB as bytes (default DEFAULT_CACHE_MAX_MB; 0 turns the optimized-graph cache off)."""
    raw = os.environ.get("GPTEDGE_CACHE_MAX_MB", "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_CACHE_MAX_MB
    except ValueError:
        log.warning("gptedge: GPTEDGE_CACHE_MAX_MB=%r is not a number; using %d", raw, DEFAULT_CACHE_MAX_MB)
        mb = DEFAULT_CACHE_MAX_MB
    return max(0, int(mb * 2**20))


def prune_cache(folder: Path, limit: int, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used entries of `folder` until it holds at most `limit` bytes; `keep` stays.

    Returns what was removed. Entries being written (hidden .tmp- folders) are not counted or touched.
    """
    entries = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        with contextlib.suppress(OSError):
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            entries.append((entry.stat().st_mtime, size, entry))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, entry in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if keep is not None and entry == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        removed.append(entry)
    return removed


def cache_key(spec: BundleSpec, folder: Path, provider: str) -> str:
    """Bundle checksums + the files' size/mtime (a bundle loaded with verify=False may differ)
    + ORT version + provider."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|ort {ort.__version__}|{provider}|extended|".encode())
    for relative, digest in sorted(spec.files.items()):
        if relative.startswith("model.onnx"):
            st = (folder / relative).stat()
            h.update(f"{relative}={digest}:{st.st_size}:{st.st_mtime_ns}|".encode())
    return h.hexdigest()[:32]


@dataclass
class SessionInfo:
    choice: ProviderChoice  # the provider that really runs the session (after any fallback)
    cache: str  # "hit", "miss" (optimized graph written now), "off", or "failed: why"
    model_path: Path  # the file the session was built from


def create_session(model_path: Path, choice: ProviderChoice, threads: int | None,
                   key: str | None, spin: bool | None = None) -> tuple[ort.InferenceSession, SessionInfo]:
    """Build the session, reading or filling the optimized-graph cache when `key` is given.

    Providers whose optimized graphs cannot be saved (DirectML's fused nodes) are not cached.
    A cache problem costs speed only: the session is then built from the bundle directly.
    """
    session_options(choice, threads)  # a bad argument fails here, before the cache is read (or dropped as "broken")
    if threads is None:
        threads = default_threads(model_path)
    session, info = None, SessionInfo(choice, "off", model_path)
    if key is not None and TRAITS[choice.name].graph_cache and cache_limit_bytes() > 0:
        entry = cache_root() / "graphs" / key
        try:
            session, info = _cached_session(model_path, choice, threads, entry, spin)
        except Exception as exc:  # noqa: BLE001 - any cache failure (OSError, ORT Fail...) falls back to no cache
            log.warning("gptedge: optimized-graph cache unusable at %s (%s); loading without it", entry, exc)
            info = SessionInfo(choice, f"failed: {exc}", model_path)
    if session is None:
        session = _session(model_path, session_options(choice, threads, spin), choice)
    return session, _check_providers(session, info)


def _cached_session(model_path: Path, choice: ProviderChoice, threads: int | None, entry: Path, spin: bool | None):
    cached = entry / "model.onnx"
    if cached.is_file():
        try:
            scan_model(cached)  # the cache is a user-writable folder: the same checks as a bundle
            so = session_options(choice, threads, spin)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimized
            session = _session(cached, so, choice)
            with contextlib.suppress(OSError):
                os.utime(entry)  # most recently used: pruned last
            return session, SessionInfo(choice, "hit", cached)
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign entry is dropped and rebuilt
            log.warning("gptedge: dropping a broken optimized-graph cache entry %s (%s)", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        so = session_options(choice, threads, spin)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp / "model.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        session = _session(model_path, so, choice)
        if not (tmp / "model.onnx").is_file():
            raise OSError(f"onnxruntime wrote no optimized graph to {tmp}")
        try:
            os.replace(tmp, entry)  # atomic: a concurrent loader sees the whole entry or none
        except OSError:
            if not (entry / "model.onnx").is_file():  # another process may have won the race: fine
                raise
        prune_cache(entry.parent, cache_limit_bytes(), keep=entry)
        return session, SessionInfo(choice, "miss", model_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_providers(session: ort.InferenceSession, info: SessionInfo) -> SessionInfo:
    """onnxruntime drops a provider that fails to start (missing CUDA libraries) without raising: say so."""
    ort_name = TRAITS[info.choice.name].ort_name
    if info.choice.name == "cpu" or ort_name in session.get_providers():
        return info
    reason = (f"onnxruntime could not start {ort_name} (see its log above: usually missing "
              f"CUDA/cuDNN libraries or drivers); running on CPU")
    _warn(reason)
    return SessionInfo(_choice("cpu", reason), info.cache, info.model_path)


_ERRORS = ort.capi.onnxruntime_pybind11_state


def _preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu find CUDA/cuDNN from pip's nvidia-* packages
    (what `import torch` would do, without torch)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):  # it prints advice; stdout may be the user's generated text
            preload(cuda=True, cudnn=True, msvc=True)
    except (OSError, RuntimeError, ValueError) as exc:
        log.info("gptedge: onnxruntime.preload_dlls failed (%s); relying on the system library path", exc)
    if chatter.getvalue().strip():
        log.info("gptedge: onnxruntime.preload_dlls: %s", chatter.getvalue().strip())


def _session(path: Path, so: ort.SessionOptions, choice: ProviderChoice) -> ort.InferenceSession:
    """An InferenceSession, with onnxruntime's failures turned into gptedge errors that say what to do."""
    if TRAITS[choice.name].preload_nvidia_libraries:
        _preload_cuda_libraries()
    try:
        return ort.InferenceSession(str(path), so, providers=choice.ort_providers)
    except (_ERRORS.NotImplemented, _ERRORS.EPFail) as exc:
        raise ProviderError(
            f"onnxruntime {ort.__version__} cannot run {path.name} on {choice.name}: {_first_line(exc)}; "
            "export the bundle for this provider (--target) or choose another --provider"
        ) from exc
    except (_ERRORS.InvalidProtobuf, _ERRORS.InvalidGraph, _ERRORS.Fail, _ERRORS.InvalidArgument,
            _ERRORS.NoSuchFile) as exc:
        raise BundleError(f"onnxruntime cannot load {path}: {_first_line(exc)}; "
                          "the model is corrupt or incompatible, re-export it") from exc


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
