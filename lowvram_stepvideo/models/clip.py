"""hunyuan_clip: HunyuanDiT's bilingual CLIP text tower, a post-LayerNorm BERT (`transformers.BertModel` math).

Attribute names are the BertModel state-dict keys. A run uses `last_hidden_state` including padding
positions; the pooler exists only when the checkpoint has it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import empty_embedding
from ..files.configs import ClipConfig


class BertEmbeddings(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.word_embeddings = empty_embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = empty_embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = empty_embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        # token_type_ids are all zero (the release passes none) and positions are 0..S-1
        extra = self.token_type_embeddings.weight[0] + self.position_embeddings.weight[:s]  # (S, hidden)
        return self.LayerNorm(self.word_embeddings(input_ids) + extra)


class BertSelfAttention(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        b, s, hidden = x.shape
        q, k, v = (lin(x).view(b, s, self.num_heads, -1).transpose(1, 2)       # (B, heads, S, head_dim)
                   for lin in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)       # key_bias (B, 1, 1, S)
        return out.transpose(1, 2).reshape(b, s, hidden)


class BertSelfOutput(nn.Module):
    """dense + residual + LayerNorm; also the shape of BertOutput."""

    def __init__(self, in_features: int, config: ClipConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config.hidden_size, config)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, key_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"


class BertLayer(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, key_bias)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))


class BertPooler(nn.Module):
    def __init__(self, config: ClipConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(last_hidden_state[:, 0]))


class BertModel(nn.Module):
    def __init__(self, config: ClipConfig, with_pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if with_pooler else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (B, S) -> last_hidden_state (B, S, hidden), padding positions included."""
        x = self.embeddings(input_ids)  # (B, S, hidden)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # masked keys get the dtype's most negative value added, like transformers' extended attention mask
        key_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # (B,1,1,S)
        for layer in self.encoder.layer:
            x = layer(x, key_bias)
        return x

    def pooled_output(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """tanh(dense(h[:, 0])) (B, hidden); unused by a run, needs a checkpoint with pooler weights."""
        if self.pooler is None:
            raise ValueError("this CLIP checkpoint has no pooler weights; pooled_output is unavailable")
        return self.pooler(last_hidden_state)
