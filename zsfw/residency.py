"""Which weights are in memory: all of them, or, for a lazily loaded model, what lies outside the
decoder layers plus the layers a step holds at the moment.

A model loaded the usual way is ``Resident``: holding a layer costs nothing. ``lazy_model``
builds the model's skeleton on the ``meta`` device and materialises only the embedding, final
norm, head and the like; each decoder layer's tensors stay in the checkpoint's safetensors files
(memory-mapped) until a step holds the layer (``holding``) and go back to ``meta`` when the last
holder lets go. The layer-streamed driver, the factorize step and truncation hold one layer at a
time, so the whole model is never in memory at once.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import ContextManager, Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from zsfw.checkpoint.files import checkpoint_files
from zsfw.errors import CheckpointError, ModelLoadError, NonFiniteError, RecipeError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
"""safetensors dtype names."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (the classes it lists in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def layer_prefixes(model: nn.Module) -> list[str]:
    """The module names of the decoder layers, in order."""
    layers = {id(layer) for layer in decoder_layers(model)}
    return [name for name, module in model.named_modules() if id(module) in layers]


class Resident:
    """Every weight is in memory (a model loaded the usual way): holding costs nothing."""

    lazy = False

    def holding(self, index: int) -> ContextManager[None]:
        """Decoder layer ``index`` in memory for the block."""
        return nullcontext()

    def holding_names(self, names: Iterable[str]) -> ContextManager[None]:
        """The decoder layers holding the modules ``names`` in memory for the block."""
        return nullcontext()

    def sequential(self) -> ContextManager[None]:
        """Whole-model forward passes work in the block (each layer held while it runs)."""
        return nullcontext()

    def retire(self, module: nn.Module) -> None:
        """``module`` was taken out of a held layer (truncation replaced it): with lazy weights
        its tensors go back to ``meta`` now, as the layer's will when it is let go."""

    def outside_released(self, model: nn.Module) -> ContextManager[None]:
        """For the block, what lies outside the decoder layers is not in memory (a step that
        runs the layers alone), and is back after it."""
        return nullcontext()

    def parts(self, names: Iterable[str]) -> Iterator[tuple[str | None, list[str]]]:
        """The modules ``names`` in parts whose weights are in memory together, each held while
        the caller works on it: (decoder layer's name, or None for all at once; names in it)."""
        yield None, list(names)


RESIDENT = Resident()


def residency(model: nn.Module) -> Resident:
    """How ``model``'s weights are held: its ``LazyWeights`` when loaded lazily, else ``RESIDENT``."""
    return getattr(model, "_zsfw_residency", RESIDENT)


class LazyWeights(Resident):
    """The decoder layers' tensors, read from the checkpoint's safetensors when a layer is held."""

    lazy = True

    def __init__(self, model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
        self.folder, self.dtype = folder, dtype
        self.device = torch.device("cpu")  # where layers are read to (``place`` moves it)
        self._headers = _headers(folder)  # file -> (data start, header bytes, header)
        self.files = {key: file for file, (_, _, header) in self._headers.items()
                      for key in header if key != "__metadata__"}
        self.layers = decoder_layers(model)
        self.prefixes = layer_prefixes(model)
        self.holders = [0] * len(self.layers)
        self.model_class = type(model).__name__
        self._checked: set[str] = set()

    def tensor(self, key: str) -> torch.Tensor:
        """One checkpoint tensor on ``device``, floating point ones in the model's dtype and
        checked finite once."""
        file = self.files.get(key)
        if file is None:
            raise ModelLoadError(f"{self.model_class} cannot be loaded lazily from {str(self.folder)!r}: "
                                 f"its checkpoint has no tensor {key!r}; use execution.weights 'resident'")
        t = self._read(file, key).to(self.device)
        if t.is_floating_point():
            t = t.to(self.dtype)
            if key not in self._checked:
                if not all(torch.isfinite(part).all() for part in t.reshape(-1).split(1 << 22)):
                    raise NonFiniteError(f"checkpoint tensor {key!r} holds NaN or Inf values; the model's "
                                         f"weights are broken (re-load or re-convert the checkpoint)")
                self._checked.add(key)
        return t

    def _read(self, file: str, key: str) -> torch.Tensor:
        """The tensor read straight into its own memory: no memory map whose pages would count as
        this process's, no intermediate copy (``get_tensor`` peaks at about three times the
        tensor). The safetensors layout: 8-byte header length, JSON header, data."""
        path = self.folder / file
        if sys.byteorder != "little":  # the files are little-endian
            with safe_open(path, framework="pt", device="cpu") as f:
                return f.get_tensor(key)
        start, _, header = self._headers[file]
        entry = header[key]
        begin, end = entry["data_offsets"]
        t = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        if end - begin != t.numel() * t.element_size():
            raise ModelLoadError(f"checkpoint tensor {key!r} in {file} has {end - begin} bytes for shape "
                                 f"{entry['shape']} of {entry['dtype']}: the file is damaged")
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(t.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                raise ModelLoadError(f"checkpoint file {file} ends inside tensor {key!r}: it is truncated")
        return t

    def _acquire(self, index: int) -> None:
        if self.holders[index] == 0:
            _fill(self.layers[index], self.prefixes[index], self)
        self.holders[index] += 1

    def _release(self, index: int) -> None:
        self.holders[index] -= 1
        if self.holders[index] == 0:
            _empty(self.layers[index])

    @contextmanager
    def holding(self, index: int) -> Iterator[None]:
        self._acquire(index)
        try:
            yield
        finally:
            self._release(index)

    @contextmanager
    def holding_names(self, names: Iterable[str]) -> Iterator[None]:
        wanted = {i for name in names for i, prefix in enumerate(self.prefixes)
                  if name.startswith(prefix + ".")}
        with ExitStack() as stack:
            for i in sorted(wanted):
                stack.enter_context(self.holding(i))
            yield

    @contextmanager
    def sequential(self) -> Iterator[None]:
        running: list[int] = []  # layers entered and not yet left (an exception skips the leaving)

        def enter(i: int):
            def hook(module, args):
                self._acquire(i)
                running.append(i)
            return hook

        def leave(i: int):
            def hook(module, args, output):
                running.remove(i)
                self._release(i)
            return hook
        with ExitStack() as stack:
            for i, layer in enumerate(self.layers):
                stack.enter_context(layer.register_forward_pre_hook(enter(i)))
                stack.enter_context(layer.register_forward_hook(leave(i)))
            try:
                yield
            finally:
                for i in reversed(running):
                    self._release(i)

    def retire(self, module: nn.Module) -> None:
        _empty(module)

    def outside(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) of each module of ``model`` outside the decoder layers (embeddings,
        final norm, head)."""
        inside = {id(m) for layer in self.layers for m in layer.modules()}
        return [(name, m) for name, m in model.named_modules() if id(m) not in inside]

    def load_outside(self, model: nn.Module) -> None:
        """What lies outside the decoder layers read from the checkpoint (tied weights re-tied)."""
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        for name, module in self.outside(model):
            _load(module, name, self, tied)
        model.tie_weights()

    @contextmanager
    def outside_released(self, model: nn.Module) -> Iterator[None]:
        for _, module in self.outside(model):
            _empty(module, recurse=False)
        try:
            yield
        finally:
            self.load_outside(model)

    def parts(self, names: Iterable[str]) -> Iterator[tuple[str | None, list[str]]]:
        names = list(names)
        for i, prefix in enumerate(self.prefixes):
            with self.holding(i):
                yield prefix, [n for n in names if n.startswith(prefix + ".")]

    def fingerprint(self, hasher) -> None:
        """Feed the checkpoint files' names, sizes, modification times and headers (reading every
        weight would take as long as a sweep) and the dtype the layers are read in to ``hasher``."""
        hasher.update(str(self.dtype).encode())
        for file in sorted(self._headers):
            stat = (self.folder / file).stat()
            hasher.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            hasher.update(self._headers[file][1])


def _headers(folder: Path) -> dict[str, tuple[int, bytes, dict]]:
    """Each safetensors file of the checkpoint → (where its data starts, its JSON header as
    bytes, parsed), read once."""
    try:
        files = checkpoint_files(folder)
    except CheckpointError as exc:
        raise ModelLoadError(f"{exc}: lazy loading reads safetensors checkpoints; use "
                             f"execution.weights 'resident'") from None
    found = {}
    for path in files:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            raw = f.read(length) if 0 < length <= 100 * 2**20 else b""
        try:
            found[path.name] = (8 + length, raw, json.loads(raw))
        except ValueError:
            raise ModelLoadError(f"checkpoint file {str(path)!r} has no readable safetensors header: "
                                 f"the file is damaged") from None
    return found


def _direct_tensors(module: nn.Module) -> Iterator[tuple[dict, str, torch.Tensor]]:
    """(the dict holding it, its name, the tensor) for each persistent tensor of ``module`` itself."""
    for name, p in module._parameters.items():
        if p is not None:
            yield module._parameters, name, p
    for name, b in module._buffers.items():
        if b is not None and name not in module._non_persistent_buffers_set:
            yield module._buffers, name, b


def _set(module: nn.Module, holder: dict, key: str, old: torch.Tensor, new: torch.Tensor) -> None:
    grad = old.requires_grad and new.is_floating_point()
    holder[key] = nn.Parameter(new, requires_grad=grad) if holder is module._parameters else new


def _load(module: nn.Module, name: str, weights: LazyWeights, skip: set[str] = frozenset()) -> None:
    """``module``'s own persistent tensors from the checkpoint (but the keys in ``skip``)."""
    for holder, key, old in list(_direct_tensors(module)):
        full = f"{name}.{key}" if name else key
        if full not in skip:
            _set(module, holder, key, old, weights.tensor(full))


def _fill(layer: nn.Module, prefix: str, weights: LazyWeights) -> None:
    for name, module in layer.named_modules(prefix=prefix):
        _load(module, name, weights)
    left = [n for n, t in (*layer.named_parameters(), *layer.named_buffers()) if t.is_meta]
    if left:
        raise ModelLoadError(f"{weights.model_class} cannot be loaded lazily: {prefix}.{left[0]} is not "
                             f"restored from its checkpoint; use execution.weights 'resident'")


def _empty(layer: nn.Module, recurse: bool = True) -> None:
    """Every persistent tensor of ``layer`` (and of its submodules) back to ``meta`` (same shape
    and dtype, no memory)."""
    for module in layer.modules() if recurse else [layer]:
        for holder, key, old in list(_direct_tensors(module)):
            if not old.is_meta:
                _set(module, holder, key, old, torch.empty(old.shape, dtype=old.dtype, device="meta"))


def compute_device(name: str) -> torch.device:
    """The device ``execution.device`` names, checked usable here and, for a GPU, made the
    current one (what NCCL and a bare 'cuda' tensor use); see ``cuda_device``."""
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device = cuda_device(name, os.environ.get("LOCAL_RANK"), count)
        torch.cuda.set_device(device)
    return device


def cuda_device(name: str, local_rank: str | None, count: int) -> torch.device:
    """The GPU that ``execution.device`` ``name`` ('cuda' or 'cuda:N') means in a process that
    sees ``count`` GPUs: a bare 'cuda' is the process's own GPU under torchrun (``local_rank``, its
    LOCAL_RANK; without it cuda:0), so that processes do not all share cuda:0; one not there is
    a one-line error."""
    device = torch.device(name)
    index = device.index if device.index is not None else int(local_rank or 0)
    if index >= count:
        ranked = device.index is None and local_rank is not None and count > 0
        why, remedy = ((f" for LOCAL_RANK {local_rank}", f"start at most {count} process(es) per node or use 'cpu'")
                       if ranked else ("", "use 'cpu'"))
        raise RecipeError(f"execution.device is {name!r} but torch {torch.__version__} sees {count} "
                          f"CUDA device(s) here (needed: cuda:{index}{why}); {remedy}")
    return torch.device("cuda", index)


def wanted_device(name: str | None, current: torch.device, launched: bool) -> str | None:
    """Where a model now on ``current`` computes: ``execution.device`` ``name`` when set; unset,
    under torchrun (``launched``) a model on a GPU computes on its process's own GPU ('cuda', see
    ``cuda_device``: without it every process would use whichever GPU it was put on, often
    cuda:0, and none would be made current); else None, where it already is."""
    if name is None and launched and current.type == "cuda":
        return "cuda"
    return name


def place(model: nn.Module, device: torch.device) -> None:
    """``model`` onto ``device``: all of it when resident; when loaded lazily, what is loaded
    now, and the decoder layers are read onto ``device`` from then on."""
    weights = residency(model)
    if not weights.lazy:
        model.to(device)
        return
    if any(weights.holders):
        raise RuntimeError("a lazily loaded model cannot move while a layer is held")  # a pipeline bug
    weights.device = device
    for _, module in weights.outside(model):
        module._apply(lambda t: t.to(device), recurse=False)
    model.tie_weights()


def lazy_model(folder: Path, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """The causal LM in ``folder`` with its decoder layers left in the checkpoint (see the module
    docstring); everything outside them is loaded now, in ``dtype`` ("auto": the checkpoint's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = LazyWeights(model, folder, dtype)
    if not weights.layers:
        raise ModelLoadError(f"{type(model).__name__} lists no decoder layer class in _no_split_modules, "
                             f"so it cannot be loaded lazily; use execution.weights 'resident'")
    for _, module in weights.outside(model):
        if module._non_persistent_buffers_set:  # computed buffers (rotary frequencies): as transformers does
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
    weights.load_outside(model)
    model.name_or_path = model.config._name_or_path = str(folder)
    model._zsfw_residency = weights
    return model.eval()
