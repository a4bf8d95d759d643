"""Ulysses sequence parallelism (parallel.sp_size = K): the K ranks of a sequence-parallel group hold one pack.

The scheme (DeepSpeed-Ulysses, over packed documents):

  ranks     K consecutive ranks form an SP group (`torch.distributed.new_subgroups`); the world's W ranks are
            W/K data-parallel groups of K. Every rank of an SP group takes the same pack (pack/loader.step_packs)
            and keeps its own contiguous token range (`split_pack`): torch.tensor_split's uneven sizes, since
            zeropad never pads; documents may cross a range boundary. Positions are the whole pack's, sliced;
            `cu_seqlens`/`max_seqlen` stay the whole pack's, for attention.
  attention everything but attention is per token, so it runs on the local range. Attention (registered as
            `zeropad_ulysses`) receives the local q/k/v [1, H, T_k, D]; one all-to-all gathers the sequence and
            scatters the heads, [1, H/K, T, D] (KV heads fewer than K are repeated first, so each rank holds
            whole GQA groups); zeropad_varlen runs on the whole pack for those heads with the global cu_seqlens;
            a second all-to-all returns [1, T_k, H, D]. The collectives are torch.distributed.nn.functional's
            (autograd-aware: their backward is the reverse all-to-all).
  loss      each rank's loss sum covers its own targets, divided by the step's target count summed over all
            ranks (each target counted once), so the gradient wanted is the SUM over all W ranks: DDP/FSDP
            reduce over all of them, as without SP. An MoE's load-balancing loss is a product of two
            whole-pack means, so its sums are all-reduced over the SP group (`group_sum`) and each rank adds 1/K.

  images    a vision-language model (Qwen2.5-VL, Qwen3-VL) keeps the whole pack's ids, positions and media on
            every rank of the group (`split_pack(..., whole_inputs=True)`): its own forward runs the vision tower on
            all of the pack's images, the same call on every rank (so FSDP's collectives and sharding.VisionCalls stay
            in step), and scatters the features at their tokens; a forward pre-hook on its language model
            (`keep_token_range`) then keeps this rank's range of the input embeddings and positions (3-axis mRoPE,
            computed per document for the whole pack) and of Qwen3-VL's deepstack features. An image may cross
            a range boundary: each rank back-propagates through its slice only, so the gradients' sum over the
            group is the whole pack's, for the tower as for the rest.

Suffixes as in model/attention.py.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from transformers import AttentionInterface, AttentionMaskInterface

from zeropad.errors import ConfigError, ZeropadError
from zeropad.model.attention import _no_mask, varlen_attention_forward
from zeropad.pack.collate import IGNORE_INDEX, Pack
from zeropad.parallel import distributed

ULYSSES_NAME = "zeropad_ulysses"

# torch suggests its functional collectives instead, which have no autograd all-reduce (MoE's aux loss needs one);
# the autograd-aware collectives used here work on gloo and NCCL alike.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated",
                        category=FutureWarning)


def token_sizes(num_tokens: int, sp_size: int) -> list[int]:
    """The token count of each rank's range: torch.tensor_split's sizes (the first T mod K ranks get one more)."""
    base, extra = divmod(num_tokens, sp_size)
    return [base + (i < extra) for i in range(sp_size)]


def split_pack(pack: Pack, sp_rank: int, sp_size: int, whole_inputs: bool = False) -> Pack:
    """This rank's contiguous token range of `pack`: ids, positions and targets sliced; `cu_seqlens`, `max_seqlen`
    and `doc_lengths` kept whole (attention runs on the whole pack), so `num_tokens` is the whole pack's, while
    `num_targets` counts this range's targets only. With `whole_inputs` (a vision-language model, whose decoder
    keeps the range itself: `keep_token_range`) only the targets are sliced; ids, positions and media stay whole."""
    if pack.media and not whole_inputs:
        raise ZeropadError("split_pack: a pack with media keeps its inputs whole (whole_inputs=True, with "
                           "keep_token_range on the model)")
    sizes = token_sizes(pack.num_tokens, sp_size)
    if min(sizes) == 0:
        raise ZeropadError(f"a pack of {pack.num_tokens} tokens cannot be split over parallel.sp_size={sp_size} ranks")
    start = sum(sizes[:sp_rank])
    cut = lambda t: t[..., start:start + sizes[sp_rank]].contiguous()  # noqa: E731
    targets = cut(pack.target_ids)
    num_targets = int((targets != IGNORE_INDEX).sum())
    if whole_inputs:
        return replace(pack, target_ids=targets, num_targets=num_targets)
    return replace(pack, input_ids=cut(pack.input_ids), position_ids=cut(pack.position_ids), target_ids=targets,
                   num_targets=num_targets)


def check_heads(config, sp_size: int) -> None:
    """Head counts the all-to-all cannot split evenly, refused with the numbers."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % sp_size:
        raise ConfigError(f"parallel.sp_size={sp_size} must divide the model's {heads} attention heads")
    if kv_heads % sp_size and sp_size % kv_heads:
        raise ConfigError(f"parallel.sp_size={sp_size} and the model's {kv_heads} key/value heads: one must divide "
                          "the other (each rank takes whole groups of query heads sharing a key/value head)")


class SequenceParallel:
    """This rank's SP group, its rank in it, and the token sizes of the pack being attended."""

    def __init__(self, group: dist.ProcessGroup, size: int):
        self.group, self.size, self.rank = group, size, dist.get_rank(group)
        self._cu: torch.Tensor | None = None
        self._sizes: list[int] = []

    def data_parallel(self) -> tuple[int, int]:
        """(number of data-parallel groups, this rank's group)."""
        return distributed.world_size() // self.size, distributed.rank() // self.size

    def sizes(self, cu_seqlens: torch.Tensor, cu_seqlens_cpu: torch.Tensor | None = None) -> list[int]:
        # Every layer of a forward gets the same boundaries: their total is read once, from the pack's host copy
        # when there is one (from the device copy it would be a host sync on GPUs).
        cu_seqlens = cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu
        if cu_seqlens is not self._cu:
            self._cu, self._sizes = cu_seqlens, token_sizes(int(cu_seqlens[-1]), self.size)
        return self._sizes

    def to_heads(self, x_BHTD: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """[1, H, T_k, D] local tokens, all heads -> [1, H/K, T, D] all tokens, this rank's heads."""
        x_THD = x_BHTD[0].transpose(0, 1)
        tokens, heads, dim = x_THD.shape
        share = heads // self.size
        # rank j's heads first: [K, T_k, H/K, D], flattened so that dim 0 splits by destination
        send = x_THD.reshape(tokens, self.size, share, dim).transpose(0, 1).reshape(-1, share, dim)
        out = send.new_empty(sum(sizes), share, dim)
        out = dist_fn.all_to_all_single(out, send.contiguous(), sizes, [tokens] * self.size, group=self.group)
        return out.transpose(0, 1).unsqueeze(0)

    def to_tokens(self, x_BTHD: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """[1, T, H/K, D] all tokens, this rank's heads -> [1, T_k, H, D] local tokens, all heads."""
        x_THD = x_BTHD[0].contiguous()
        tokens, (heads, dim) = sizes[self.rank], x_THD.shape[1:]
        out = x_THD.new_empty(self.size * tokens, heads, dim)
        out = dist_fn.all_to_all_single(out, x_THD, [tokens] * self.size, sizes, group=self.group)
        return out.reshape(self.size, tokens, heads, dim).transpose(0, 1).reshape(1, tokens, self.size * heads, dim)


_ACTIVE: SequenceParallel | None = None


def active() -> SequenceParallel | None:
    return _ACTIVE


@contextlib.contextmanager
def sequence_parallel(sp_size: int):
    """The run's SP groups (collective: every rank enters); yields this rank's SequenceParallel, or None for
    sp_size 1."""
    global _ACTIVE
    if sp_size == 1:
        yield None
        return
    world = distributed.world_size()
    if world % sp_size:
        raise ConfigError(f"parallel.sp_size={sp_size} must divide the number of processes ({world})")
    group, _ = dist.new_subgroups(group_size=sp_size)
    _ACTIVE = SequenceParallel(group, sp_size)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = None


def group_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over this rank's SP group (with gradient: its backward sums the gradients); itself without SP."""
    return tensor if _ACTIVE is None else dist_fn.all_reduce(tensor, group=_ACTIVE.group)


def keep_token_range(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """A forward pre-hook on a VLM's language model that keeps this rank's token range of what the multimodal
    model built for the whole pack (see the module docstring); a no-op outside an SP run."""
    return model.get_decoder().register_forward_pre_hook(_slice_decoder_inputs, with_kwargs=True)


def _slice_decoder_inputs(module, args, kwargs):
    sp = _ACTIVE
    if sp is None:
        return None
    embeds = kwargs["inputs_embeds"]
    sizes = sp.sizes(kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_cpu"))
    if embeds.shape[1] != sum(sizes):
        raise ZeropadError(f"{ULYSSES_NAME}: the language model got {embeds.shape[1]} input embeddings for a pack of "
                           f"{sum(sizes)} tokens (a VLM's pack keeps its inputs whole: split_pack(whole_inputs=True))")
    start, end = sum(sizes[:sp.rank]), sum(sizes[:sp.rank + 1])
    kept = {**kwargs, "inputs_embeds": embeds[:, start:end], "position_ids": kwargs["position_ids"][..., start:end]}
    visual = kwargs.get("visual_pos_masks")
    if visual is not None:  # Qwen3-VL's deepstack: features added at the visual tokens inside the decoder, in order
        before, inside = int(visual[:, :start].sum()), int(visual[:, start:end].sum())
        kept["visual_pos_masks"] = visual[:, start:end]
        kept["deepstack_visual_embeds"] = [e[before:before + inside] for e in kwargs["deepstack_visual_embeds"]]
    return args, kept


def ulysses_attention_forward(module, query, key, value, attention_mask, s_aux=None, cu_seq_lens_q=None, **kwargs):
    """zeropad_varlen on the whole pack for this rank's heads; q/k/v and the output hold the local tokens."""
    sp = _ACTIVE
    if sp is None:
        raise ZeropadError(f"{ULYSSES_NAME} attention runs inside a parallel.sp_size > 1 run only")
    if cu_seq_lens_q is None:
        raise ZeropadError(f"{ULYSSES_NAME}: no cu_seq_lens reached the attention (packs only)")
    sizes = sp.sizes(cu_seq_lens_q, kwargs.get("cu_seq_lens_cpu"))
    repeat = sp.size // key.shape[1]
    if repeat > 1:  # fewer KV heads than ranks: each rank gets a copy of its query heads' KV head
        key, value = (x.repeat_interleave(repeat, dim=1) for x in (key, value))
    if s_aux is not None:  # sinks are per query head
        s_aux = s_aux.chunk(sp.size)[sp.rank]
    q, k, v = (sp.to_heads(x, sizes) for x in (query, key, value))
    out, _ = varlen_attention_forward(module, q, k, v, attention_mask, s_aux=s_aux, cu_seq_lens_q=cu_seq_lens_q,
                                      **kwargs)
    return sp.to_tokens(out, sizes), None


AttentionInterface.register(ULYSSES_NAME, ulysses_attention_forward)
AttentionMaskInterface.register(ULYSSES_NAME, _no_mask)
