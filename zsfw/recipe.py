"""Recipes: what to compress and how, in the llm-compressor YAML shape users know.

    zero_sum_stage:
      compression_modifiers:
        ZeroSumSVDModifier:
          targets: [Linear]          # class names, or "re:" full-match regexes over module names
          ignore: [lm_head]
          ratio: 0.8                 # bytes kept, vs the targets at 16 bits per weight
          scorer: first_order        # a name, or {name: ..., <options>}
          allocator: zero_sum
          stages: []                 # pre-compression stages, e.g. [{name: prehab, ...}]
          corrector: null            # e.g. {name: projected_gradient, cycles: 5}
          storage: bf16              # or a list, e.g. [bf16, pivga, int8]: a format chosen per layer
          calibration: {samples: 32, sequence_length: 512}

``load_recipe`` takes a path, a YAML string, a dict or a ``Recipe`` and validates it; every error
names the source, the key, the bad value and what is allowed.
"""

from __future__ import annotations

import codecs
import os
import reprlib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zsfw import plugins
from zsfw.errors import PluginError, RecipeError

MODIFIER_NAME = "ZeroSumSVDModifier"

MAX_YAML_NODES = 100_000
"""The most nodes a recipe's YAML may hold once its aliases are expanded: a recipe has a few
hundred; nested aliases ("billion laughs") would otherwise expand to billions when the values
are validated, printed or saved."""

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 6, 4, 60, 60
SHOWN_CHARS = 120
"""The longest a recipe value is shown in an error message."""


def shown(value: Any) -> str:
    """``repr(value)`` cut to at most ``SHOWN_CHARS`` characters, without building the whole
    repr of a huge or deeply nested value (an error message quotes what the user wrote)."""
    text = _SHORT.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


class PluginSpec(BaseModel):
    """A plugin by registered name, with the options its constructor takes."""

    model_config = ConfigDict(extra="forbid")
    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and "options" not in value:
            rest = {k: v for k, v in value.items() if k != "name"}
            return {"name": value.get("name"), "options": rest}
        return value

    def to_yaml(self) -> Any:
        return self.name if not self.options else {"name": self.name, **self.options}


class CalibrationConfig(BaseModel):
    """How calibration windows are drawn from the dataset."""

    model_config = ConfigDict(extra="forbid")
    samples: int = Field(32, gt=0, description="number of windows")
    sequence_length: int = Field(512, gt=1, description="tokens per window")
    gradient_samples: int | None = Field(
        None, gt=0, description="windows that also get a backward pass (default: all)")
    batch_size: int = Field(1, gt=0, description="windows per forward pass")
    seed: int = 0
    checkpoint_layers: bool = Field(
        False, description="recompute decoder layers in the backward pass: ~1 more forward of "
                           "time for less activation memory")
    max_tokens: int | None = Field(
        None, gt=1, description="draw windows only from the first max_tokens tokens of the text")
    validation_samples: int = Field(
        8, ge=0, description="held-out windows of the same text (forward only) on which a "
                             "corrector judges its steps and keeps its best state; drawn only "
                             "when a corrector is set")
    training_samples: int = Field(
        8, gt=0, description="held-out windows of the same text, apart from the calibration and "
                             "validation ones, that a training stage (prehab) or a corrector "
                             "(refine with windows: training) learns from; drawn only when one is set")

    @model_validator(mode="after")
    def _gradient_within_samples(self) -> "CalibrationConfig":
        if self.gradient_samples is not None and self.gradient_samples > self.samples:
            raise ValueError(f"gradient_samples ({self.gradient_samples}) must be <= samples "
                             f"({self.samples})")
        return self


class ExecutionConfig(BaseModel):
    """Who drives the calibration windows through the model (the results are the same)."""

    model_config = ConfigDict(extra="forbid")
    driver: Literal["memory", "streamed"] = Field(
        "memory", description="memory: one pass over the whole model; streamed: the exact "
                              "two-sweep pass, one decoder layer at a time")
    offload: Literal["memory", "disk"] = Field(
        "memory", description="streamed: where the boundaries' hidden states wait between the "
                              "sweeps (disk: the spill folder)")
    weights: Literal["resident", "lazy"] = Field(
        "resident", description="how the CLI loads the model: resident: all of it; lazy: the "
                                "decoder layers stay in the checkpoint's safetensors and are read "
                                "one at a time (driver 'streamed'; the model is written to the "
                                "output folder as its layers are compressed)")

    device: str | None = Field(
        None, description="where the layers compute: 'cpu', 'cuda' or 'cuda:N' (under torchrun "
                          "'cuda' is each process's own GPU, its LOCAL_RANK); unset: where the model "
                          "already is (the CLI loads it on the CPU), but under torchrun a model on a "
                          "GPU moves to its process's own")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="the dtype the CLI loads the weights in (auto: the checkpoint's own); "
                               "statistics accumulate in float32/float64 whatever it is")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        import torch

        if value is None:
            return value
        try:
            kind = torch.device(value).type
        except (RuntimeError, ValueError):
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device {shown(value)} is not 'cpu', 'cuda' or 'cuda:N'")
        return value

    @model_validator(mode="after")
    def _lazy_streams(self) -> "ExecutionConfig":
        if self.weights == "lazy" and self.driver != "streamed":
            raise ValueError(f"weights 'lazy' needs driver 'streamed', not {self.driver!r}")
        return self


class ZeroSumSVDModifier(BaseModel):
    """Low-rank compression of the target linear layers under one global byte budget."""

    model_config = ConfigDict(extra="forbid")
    targets: list[str] = Field(default_factory=lambda: ["Linear"], min_length=1)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    ratio: float = Field(0.8, gt=0, le=1)
    stages: list[PluginSpec] = Field(default_factory=list)
    scorer: PluginSpec = PluginSpec(name="first_order")
    allocator: PluginSpec = PluginSpec(name="zero_sum")
    corrector: PluginSpec | None = None
    storage: PluginSpec = PluginSpec(name="bf16")
    whiten: bool = True
    damping: float = Field(1e-4, ge=0, description="relative to the mean diagonal of C")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    @property
    def validation_windows(self) -> int:
        """How many validation windows a run draws: those a corrector, a model-aware allocator or
        a training stage judges its steps on, none for a run that has none of them."""
        from zsfw.capabilities import needs

        model_aware = needs("allocator", self.allocator).needs_model
        judged = self.corrector or model_aware or self.training_windows
        return self.calibration.validation_samples if judged else 0

    @property
    def training_windows(self) -> int:
        """How many training windows a run draws: ``training_samples`` when a stage trains on
        them or the corrector does (as their classes declare for these options: ``refine`` with
        ``windows: training``), else none."""
        from zsfw.capabilities import needs

        training = (any(needs("stage", s).needs_training for s in self.stages)
                    or bool(self.corrector and needs("corrector", self.corrector).needs_training))
        return self.calibration.training_samples if training else 0

    @field_validator("storage", mode="before")
    @classmethod
    def _format_list(cls, value: Any) -> Any:
        """``storage: [bf16, pivga, …]`` is ``{name: auto, formats: [bf16, pivga, …]}``."""
        return {"name": "auto", "formats": value} if isinstance(value, list) else value

    @field_validator("targets", "ignore")
    @classmethod
    def _patterns(cls, values: list[str]) -> list[str]:
        import re

        for v in values:
            if v.startswith("re:"):
                try:
                    re.compile(v[3:])
                except re.error as exc:
                    raise ValueError(f"{shown(v)} is not a valid regex: {exc}") from exc
        return values


DEFAULT_CORRECTOR = {"name": "refine", "steps": 24, "lr": 1.0e-4, "validate_every": 12}
"""The default recipe's corrector (``recipes/zero_sum.yaml``): a modifier without a ``corrector``
key has none (one shot); the built-in default refines the factors for a bounded number of steps."""


def default_modifier() -> ZeroSumSVDModifier:
    """The default recipe's modifier: Zero-Sum SVD at ratio 0.8, then ``DEFAULT_CORRECTOR``."""
    return ZeroSumSVDModifier(corrector=PluginSpec.model_validate(DEFAULT_CORRECTOR))


class Recipe(BaseModel):
    """One stage holding one modifier (the llm-compressor layout)."""

    model_config = ConfigDict(extra="forbid")
    stage: str = "zero_sum_stage"
    group: str = "compression_modifiers"
    modifier: ZeroSumSVDModifier = Field(default_factory=default_modifier)
    source: str = Field("<python>", exclude=True)

    def to_dict(self) -> dict[str, Any]:
        m = self.modifier
        body = m.model_dump(exclude={"stages", "scorer", "allocator", "corrector", "storage",
                                     "calibration", "execution"})
        body.update(stages=[s.to_yaml() for s in m.stages], scorer=m.scorer.to_yaml(),
                    allocator=m.allocator.to_yaml(), corrector=m.corrector.to_yaml() if m.corrector else None,
                    storage=m.storage.to_yaml(), calibration=m.calibration.model_dump(),
                    execution=m.execution.model_dump())
        return {self.stage: {self.group: {MODIFIER_NAME: body}}}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml())


RecipeLike = Union[str, os.PathLike, dict, Recipe, ZeroSumSVDModifier, None]


def load_recipe(recipe: RecipeLike = None) -> Recipe:
    """Validate a recipe given as a path, a YAML string, a dict or an object (None: defaults)."""
    if recipe is None:
        return _check_plugins(Recipe())
    if isinstance(recipe, Recipe):
        return _check_plugins(recipe)
    if isinstance(recipe, ZeroSumSVDModifier):
        return _check_plugins(Recipe(modifier=recipe))
    source = "<dict>"
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and _looks_like_path(recipe)):
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        source = str(path)
        recipe = _parse_yaml(_decoded(path.read_bytes(), source), source)
    elif isinstance(recipe, str):
        source = "<yaml string>"
        recipe = _parse_yaml(recipe, source)
    if not isinstance(recipe, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping stage -> modifiers -> "
                          f"{MODIFIER_NAME}, got {type(recipe).__name__}")
    return _check_plugins(_from_dict(recipe, source))


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and (text.endswith((".yaml", ".yml")) or os.path.exists(text))


_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _decoded(data: bytes, source: str) -> str:
    """A recipe file's text: UTF-8, or UTF-8/UTF-16 after a byte-order mark (what YAML allows);
    anything else is refused naming the first byte that is not UTF-8."""
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{source}: byte {exc.start} (0x{data[exc.start]:02x}) is not {encoding.upper()} "
                          f"text ({exc.reason}); recipes must be UTF-8 (or UTF-16 with a byte-order "
                          f"mark): save the file as UTF-8") from None


def _parse_yaml(text: str, source: str) -> Any:
    """The YAML document in ``text``, refused when its aliases expand past ``MAX_YAML_NODES``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, set())
        if size > MAX_YAML_NODES:
            raise RecipeError(f"{source}: its YAML aliases expand to {size} values, more than the "
                              f"{MAX_YAML_NODES} a recipe may hold; write the values out instead of "
                              f"nesting aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        where = f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if problem and mark else exc
        raise RecipeError(f"{source}: not valid YAML: {' '.join(str(where).split())}") from None
    except RecursionError:
        raise RecipeError(f"{source}: its YAML is nested too deeply to be a recipe") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many nodes ``node`` stands for once every alias in it is expanded (an alias is the
    node it names: counted once per use). ``sizes`` memoizes shared nodes, so this takes time
    in the nodes written, not in the expansion; a node that contains itself counts as
    unbounded."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        return MAX_YAML_NODES + 1
    open_.add(key)
    children: list = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    sizes[key] = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    open_.discard(key)
    return sizes[key]


def _single(mapping: Any, where: str, what: str, source: str) -> tuple[str, Any]:
    if not isinstance(mapping, dict) or len(mapping) != 1:
        got = shown(list(mapping)) if isinstance(mapping, dict) else type(mapping).__name__
        raise RecipeError(f"{source}: {where} must hold exactly one {what}, got {got}")
    return next(iter(mapping.items()))


def _from_dict(data: dict, source: str) -> Recipe:
    stage, groups = _single(data, "the recipe", "stage (e.g. zero_sum_stage)", source)
    group, modifiers = _single(groups, stage, "modifier group (e.g. compression_modifiers)", source)
    name, args = _single(modifiers, f"{stage}.{group}", f"modifier ({MODIFIER_NAME})", source)
    where = f"{stage}.{group}.{name}"
    if name != MODIFIER_NAME:
        raise RecipeError(f"{source}: {where}: unknown modifier {shown(name)}; allowed: {MODIFIER_NAME}")
    try:
        modifier = ZeroSumSVDModifier.model_validate(args or {})
    except ValidationError as exc:
        raise RecipeError(_describe(exc, source, where)) from None
    return Recipe(stage=stage, group=group, modifier=modifier, source=source)


def _describe(exc: ValidationError, source: str, where: str) -> str:
    """The first validation error in one line (the value it got cut short), and how many more."""
    errors = exc.errors()
    err = errors[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join([where, *loc])
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see the docs"
        line = f"{source}: {key}: unknown key; allowed keys: {allowed}"
    else:
        line = f"{source}: {key}: {' '.join(err['msg'].split())} (got {shown(err.get('input'))})"
    return line + (f" (and {len(errors) - 1} more error(s) in this recipe)" if len(errors) > 1 else "")


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = ZeroSumSVDModifier
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _check_plugins(recipe: Recipe) -> Recipe:
    """Every plugin the recipe names is registered (once) and accepts the options it is given."""
    m = recipe.modifier
    where = f"{recipe.source}: {recipe.stage}.{recipe.group}.{MODIFIER_NAME}"
    specs = [(f"stages[{i}]", "stage", s) for i, s in enumerate(m.stages)]
    specs += [(kind, kind, spec) for kind, spec in (("scorer", m.scorer), ("allocator", m.allocator),
                                                     ("corrector", m.corrector), ("storage", m.storage))]
    for key, kind, spec in specs:
        if spec is None:
            continue
        registered = plugins.names(kind)
        if spec.name not in registered:
            raise RecipeError(f"{where}.{key}: {spec.name!r} is not a registered {kind}; "
                              f"registered: {', '.join(registered) or '(none)'}")
        try:
            allowed = plugins.option_names(kind, spec.name)
        except PluginError as exc:
            raise RecipeError(f"{where}.{key}: {exc}") from None
        unknown = sorted(set(spec.options) - allowed) if allowed is not None else []
        if unknown:
            raise RecipeError(f"{where}.{key}.{unknown[0]}: unknown option of {kind} "
                              f"{spec.name!r}; allowed: {', '.join(sorted(allowed)) or '(none)'}")
    return recipe
