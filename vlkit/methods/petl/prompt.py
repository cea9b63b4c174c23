"""Prompt tuning on any protocol backbone, written by hand.

Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning" (EMNLP 2021),
Sec. 2: ``n`` learned vectors ``P_e`` (n x D) are concatenated with the embedded input,
``[P_e; X_e]``, and only ``P_e`` is trained. Deep prompts (``deep=True``) follow P-Tuning v2
(Liu et al., ACL 2022) / VPT-Deep (Jia et al., ECCV 2022, Eq. 6): every unit reads fresh
learned prompts in the prompt positions, replacing what the previous unit wrote there.
For vision-language backbones this is the "Prompt" baseline of the SHERL / UniPT tables.

Why not PEFT: PEFT's prompt tuning (``PromptTuningConfig`` + ``get_peft_model``) needs a
``transformers.PreTrainedModel`` and feeds ``inputs_embeds`` to it; a vlkit backbone is a
protocol module whose embedding is its own ``embed`` (ViLT's joint text+image sequence,
METER's two towers), so the prompts are inserted there, through the protocol.

Where the prompts go. ``embed``'s :class:`~vlkit.models.protocol.State` stream ``s`` of shape
(B, N, D) becomes (B, N + n, D):

* ``position="after_cls"`` (default): ``[x_0; P; x_1 .. x_{N-1}]`` -- the [CLS] token stays at
  position 0, so the backbones' CLS poolers (BERT, ViLT, METER) pool the same token;
* ``position="append"``: ``[x_0 .. x_{N-1}; P]``.

The stream's keep-mask gets ones at the prompt positions (a ``None`` mask stays ``None``:
everything attends to everything). Prompts carry no position embedding (they are added after
the embedding layer). Mean pooling (``minilm``) averages over the prompt tokens too, since the
mask marks them as real tokens. ``State.extra["prompt_slices"]`` records
``{stream: (start, stop)}``; ViLT's ``extra["num_text"]`` (where the image tokens start) is
shifted by ``n`` when the prompts go inside the text part.

Not supported: streams with a relative position bias computed for the embedded length (T5's
``bias:enc`` / ``bias:dec``) -- prompting them would need the bias recomputed for ``N + n``;
``embed`` raises.
"""

from __future__ import annotations

import torch
from torch import nn

from vlkit.models.protocol import Backbone, BackboneOutput, State, UnitContext, UnitSpec, UnknownNameError

from .basic import check_backbone, check_positive_int, seeded, unit_width

__all__ = ["PromptTuned", "apply_prompt", "POSITIONS", "PROMPT_INITS"]

POSITIONS = ("after_cls", "append")
PROMPT_INITS = ("uniform", "normal")


def _insert(x: torch.Tensor, at: int, stop: int, p: torch.Tensor) -> torch.Tensor:
    """``[x[:, :at]; p; x[:, stop:]]`` with ``p`` (n, D) broadcast over the batch."""
    p = p.to(dtype=x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :at], p, x[:, stop:]], dim=1)


class PromptTuned(Backbone):
    """A frozen backbone with learned prompt tokens; itself a protocol backbone.

    The units, specs and every backbone-specific attribute (``config``, ``encode_text``, ...)
    are the wrapped backbone's (``self.backbone``): ``units``, ``unit``, ``replace_unit``,
    ``run_units`` act on the same modules, and the state dict holds them once (under
    ``backbone.``) beside ``prompts.<stream>`` and ``deep_prompts.<unit>``. Only ``embed``
    (prompt insertion) and ``run_unit`` (deep prompts) differ. ``encode_image`` /
    ``encode_text`` of two-tower backbones run the bare towers, without prompts.

    Parameters: ``prompts[s]`` (n, D_s) per prompted stream; with ``deep``,
    ``deep_prompts[u]`` (n, D_u) for every other unit ``u`` of those streams, so
    ``n * sum(D_u over the streams' units)`` in all (``n * D * units`` when one width).
    """

    def __init__(self, backbone: Backbone, n_prompts: int, streams: tuple[str, ...], deep: bool = False,
                 position: str = "after_cls", init: str = "uniform"):
        nn.Module.__init__(self)  # not Backbone.__init__: the specs and blocks are the backbone's
        self.backbone = backbone
        self.n_prompts, self.deep, self.position, self.init = n_prompts, deep, position, init
        self.prompt_streams = tuple(streams)
        first = {}
        for spec in backbone.specs:
            first.setdefault(spec.stream, spec.name)
        self.prompts = nn.ParameterDict({
            s: nn.Parameter(self._fresh(unit_width(backbone.unit(first[s])))) for s in self.prompt_streams})
        self.deep_prompts = nn.ParameterDict({
            spec.name: nn.Parameter(self._fresh(unit_width(backbone.unit(spec.name))))
            for spec in backbone.specs
            if deep and spec.stream in self.prompt_streams and spec.name != first[spec.stream]})

    def _fresh(self, dim: int) -> torch.Tensor:
        """A new (n, D) prompt: U(-0.5, 0.5) (Lester et al.'s random-uniform init) or N(0, 0.02)."""
        ref = next(self.backbone.parameters())
        t = torch.empty(self.n_prompts, dim, device=ref.device, dtype=ref.dtype)
        return nn.init.uniform_(t, -0.5, 0.5) if self.init == "uniform" else nn.init.normal_(t, 0.0, 0.02)

    # ------------------------------------------------------------------ delegation
    @property
    def _specs(self) -> list[UnitSpec]:
        return self.backbone._specs

    @property
    def blocks(self) -> nn.ModuleDict:
        return self.backbone.blocks

    @property
    def preset(self) -> str:
        return self.backbone.preset

    @preset.setter
    def preset(self, value: str) -> None:
        self.backbone.preset = value

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name.startswith("__") or "backbone" not in modules:
                raise
            return getattr(modules["backbone"], name)

    def _context_for(self, spec: UnitSpec, state: State) -> UnitContext:
        return self.backbone._context_for(spec, state)

    def _after_unit(self, i: int, state: State) -> None:
        self.backbone._after_unit(i, state)

    def finalize(self, state: State) -> BackboneOutput:
        return self.backbone.finalize(state)

    def dummy_inputs(self, *args, **kwargs) -> dict:
        return self.backbone.dummy_inputs(*args, **kwargs)

    # ------------------------------------------------------------------ prompts
    def embed(self, **inputs) -> State:
        """The backbone's embedding with ``n`` prompt tokens inserted in each prompted stream
        (after the [CLS] token or at the end) and the masks extended with ones."""
        state = self.backbone.embed(**inputs)
        slices = {}
        for s in self.prompt_streams:
            if state.extra.get(f"bias:{s}") is not None:
                raise ValueError(f"stream {s!r} carries a relative position bias computed for its embedded length "
                                 f"({type(self.backbone).__name__}); prompt tuning does not support it")
            x, p = state.streams[s], self.prompts[s]
            if x.shape[-1] != p.shape[-1]:
                raise ValueError(f"stream {s!r} has width {x.shape[-1]} after embed but its prompts have {p.shape[-1]}")
            b, n = x.shape[:2]
            at = 1 if self.position == "after_cls" else n
            state.streams[s] = _insert(x, at, at, p)
            mask = state.masks.get(s)
            if mask is not None:
                state.masks[s] = torch.cat([mask[:, :at], mask.new_ones(b, self.n_prompts), mask[:, at:]], dim=1)
            num_text = state.extra.get("num_text")
            # ViLT: the joint stream's image tokens start n positions later
            if isinstance(num_text, int) and at <= num_text and len(state.streams) == 1:
                state.extra["num_text"] = num_text + self.n_prompts
            slices[s] = (at, at + self.n_prompts)
        state.extra["prompt_slices"] = slices
        return state

    def run_unit(self, i: int, state: State, attentions: list | None = None) -> torch.Tensor:
        """Deep prompts: write unit ``i``'s own prompts into the prompt positions, then run it."""
        spec = self._specs[i]
        if spec.name in self.deep_prompts:
            slices = state.extra.get("prompt_slices")
            if slices is None or spec.stream not in slices:
                raise ValueError("this state has no prompt positions: build it with the prompt-tuned model's embed")
            a, b = slices[spec.stream]
            state.streams[spec.stream] = _insert(state.streams[spec.stream], a, b, self.deep_prompts[spec.name])
        return super().run_unit(i, state, attentions)

    def extra_repr(self) -> str:
        return (f"n_prompts={self.n_prompts}, streams={self.prompt_streams}, deep={self.deep}, "
                f"position={self.position!r}, init={self.init!r}")


def apply_prompt(backbone: Backbone, *, n_prompts: int = 20, deep: bool = False, streams=None,
                 position: str = "after_cls", init: str = "uniform", seed: int = 0) -> PromptTuned:
    """Prompt tuning: wrap ``backbone`` (frozen in place) in a :class:`PromptTuned`.

    Options:

    * ``n_prompts`` (20): prompt length n (Lester et al., Fig. 3: 20 tokens already reach most
      of the gain of longer prompts).
    * ``deep`` (False): fresh prompts before every unit (P-Tuning v2 / VPT-Deep).
    * ``streams`` (None = every stream the units write: ``joint`` for ViLT, ``text`` for BERT,
      ``text`` and ``vision`` for METER / X-VLM): which state streams get prompts.
    * ``position`` (``"after_cls"``): ``"after_cls"`` keeps [CLS] at position 0; ``"append"``.
    * ``init`` (``"uniform"``): ``U(-0.5, 0.5)`` (Lester et al.'s random init) or ``"normal"``
      (N(0, 0.02)).
    * ``seed``: seed of the prompts' initialisation.

    Trainable: the prompts only, ``n * D`` per stream (``* units`` with ``deep``).
    """
    check_backbone(backbone)
    check_positive_int("n_prompts", n_prompts)
    if not isinstance(deep, bool):
        raise ValueError(f"deep must be True or False, got {deep!r}")
    if position not in POSITIONS:
        raise UnknownNameError("prompt position", position, POSITIONS)
    if init not in PROMPT_INITS:
        raise UnknownNameError("prompt init", init, PROMPT_INITS)
    valid = list(dict.fromkeys(spec.stream for spec in backbone.specs))
    if not valid:
        raise ValueError(f"{type(backbone).__name__} has no units to prompt")
    streams = valid if streams is None else ([streams] if isinstance(streams, str) else list(streams))
    if not streams:
        raise ValueError(f"streams must name at least one of {valid}")
    for s in streams:
        if s not in valid:
            raise UnknownNameError("prompt stream", s, valid)
    if len(set(streams)) != len(streams):
        raise ValueError(f"duplicate streams in {streams}")
    backbone.requires_grad_(False)
    with seeded(seed):
        model = PromptTuned(backbone, n_prompts, tuple(streams), deep=deep, position=position, init=init)
    return model
