"""Invariants 2-3 for an early-fusion token model (Chameleon): a pack of documents whose images become VQ codes in
the token sequence, forward and backward, equals each document alone (unpadded, eager attention, its own
images). Documents come from text with `<image>` placeholders and generated PIL images of different sizes
through ChameleonProcessor, with a tiny word-level tokenizer whose vocabulary is the model's vocabulary map."""

import numpy as np
import pytest
import torch
from PIL import Image

from zeropad.data.chat import Sample
from zeropad.family import CHAMELEON_BOI as BOI_TOKEN
from zeropad.family import CHAMELEON_EOI as EOI_TOKEN
from zeropad.family import chameleon_image_tokens as image_seq_length
from zeropad.model.attention import ATTN_NAME
from zeropad.model.chameleon import chameleon_processor, document_from_text
from zeropad.model.vlm import image_placeholder, position_rule
from zeropad.verify import TOLERANCE, check_documents, packed_forward_backward

from packing import n_images, pack_docs

NUM_WORDS, NUM_CODES = 40, 32
# Chameleon names VQ code k "IMGIMG<k's digits as letters A-J>Z"; the model finds its codes by that prefix.
CODE_TOKENS = ["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(k)) + "Z" for k in range(NUM_CODES)]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", BOI_TOKEN, EOI_TOKEN]
# (height, width) before the processor resizes and crops them to the VQ resolution
IMAGE_SIZES = [(40, 57), (23, 31), (64, 32), (33, 90)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = SPECIAL_TOKENS + [f"w{i}" for i in range(NUM_WORDS)] + CODE_TOKENS
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<image>", BOI_TOKEN, EOI_TOKEN])


def tiny_chameleon(tokenizer):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab = tokenizer.get_vocab()
    # 32 px, three halvings: a 4 x 4 code grid, 16 tokens per image. GroupNorm(32) needs 32 channels.
    vq = dict(resolution=32, channel_multiplier=[1, 1, 1, 1], base_channels=32, num_res_blocks=1,
              latent_channels=16, embed_dim=16, num_embeddings=NUM_CODES)
    config = ChameleonConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             vocabulary_map=vocab, vq_config=vq)
    torch.manual_seed(0)
    return ChameleonForConditionalGeneration(config).float()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_chameleon(tokenizer)


@pytest.fixture(scope="module")
def processor(tokenizer, model):
    return chameleon_processor(tokenizer, model.config)


def pil_images(sizes, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def words(rng, n) -> str:
    return " ".join(f"w{i}" for i in rng.integers(0, NUM_WORDS, n))


def image_pixels(image, processor) -> torch.Tensor:
    """One image file or PIL image -> pixel_values [1, C, R, R] as the model takes them."""
    image = image if isinstance(image, Image.Image) else Image.open(image)
    return processor(images=[image], return_tensors="pt")["pixel_values"]


def make_docs(processor, seed=0) -> list[Sample]:
    """4 documents: one image, text only, two images, one image; 4 images of different original sizes."""
    rng = np.random.default_rng(seed)
    images = pil_images(IMAGE_SIZES, seed)
    texts = [f"{words(rng, 5)} <image> {words(rng, 7)}", words(rng, 9),
             f"{words(rng, 3)} <image> {words(rng, 4)} <image> {words(rng, 6)}", f"<image> {words(rng, 5)}"]
    image_idx = [[0], [], [1, 2], [3]]
    return [document_from_text(processor, t, [images[i] for i in idx]) for t, idx in zip(texts, image_idx)]


def test_documents_match_the_processor_layout(model, processor, tokenizer, tmp_path):
    """Each image is <boi> <image>*N <eoi> with N the VQ grid, placeholders are never targets, and an image
    file gives the same pixels as the PIL image it was saved from."""
    config = model.config
    placeholder = image_placeholder(config)
    assert placeholder[0] == tokenizer.convert_tokens_to_ids(BOI_TOKEN) == processor.image_start_token_id
    assert placeholder[-1] == tokenizer.convert_tokens_to_ids(EOI_TOKEN) == processor.image_end_token_id
    assert image_seq_length(config) == 16 == model.get_image_tokens(torch.zeros(1, 3, 32, 32)).shape[1]

    image = pil_images([(40, 57)])[0]
    doc = document_from_text(processor, "w1 w2 <image> w3", [image])
    expected = tokenizer.convert_tokens_to_ids(["w1", "w2"]) + placeholder + tokenizer.convert_tokens_to_ids(["w3"])
    assert doc.input_ids.tolist() == expected + [tokenizer.eos_token_id]
    assert not doc.loss_mask[doc.input_ids == config.image_token_id].any()
    assert doc.loss_mask.sum() == len(doc) - image_seq_length(config)
    image.save(tmp_path / "image.png")
    assert torch.equal(image_pixels(tmp_path / "image.png", processor.image_processor), doc.media["pixel_values"])
    assert doc.media["pixel_values"].shape == (1, 3, 32, 32)


def test_packed_equals_per_document_reference(model, processor):
    docs = make_docs(processor)
    assert sum(n_images(d) for d in docs) == 4 and any(n_images(d) == 0 for d in docs)
    report = check_documents(model, docs)
    print(report.summary())
    assert report.max_logit_diff <= TOLERANCE, report.summary()
    assert report.max_grad_diff <= TOLERANCE, report.summary()


def test_gradients_reach_image_codes_not_the_frozen_vq_model(model, processor):
    """Not vacuous: the pack's VQ codes are embedded and trained (their embedding rows get gradients),
    while the VQ-VAE itself gets none (its codes come from an argmin)."""
    model.set_attn_implementation(ATTN_NAME)
    docs = make_docs(processor)
    _, grads = packed_forward_backward(model, docs, position_rule(model))
    model.zero_grad(set_to_none=True)
    assert not [n for n in grads if ".vqmodel." in n]
    assert {n for n, p in model.named_parameters() if ".vqmodel." not in n} == set(grads)
    pixels = torch.cat([d.media["pixel_values"] for d in docs if n_images(d)])
    codes = model.get_image_tokens(pixels).unique()
    embed_grad = grads["model.embed_tokens.weight"]
    assert (embed_grad[codes].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("change", ["tokens", "image"])
def test_changing_one_document_changes_no_other(model, processor, change):
    model.eval()
    model.set_attn_implementation(ATTN_NAME)
    docs = make_docs(processor)
    changed = list(docs)
    d = docs[2]  # two images
    if change == "tokens":
        ids = d.input_ids.copy()
        first_word = len(SPECIAL_TOKENS)
        text = np.flatnonzero((ids >= first_word) & (ids < first_word + NUM_WORDS))[:3]
        ids[text] = first_word + (ids[text] - first_word + 1) % NUM_WORDS  # three words -> the next word
        changed[2] = Sample(ids, d.loss_mask, d.media)
    else:
        pixels = d.media["pixel_values"].clone()
        pixels[1] = image_pixels(pil_images([(50, 50)], seed=7)[0], processor.image_processor)[0]
        changed[2] = Sample(d.input_ids, d.loss_mask, {"pixel_values": pixels})
    with torch.no_grad():
        before = model(**pack_docs(model, docs).model_inputs()).logits[0]
        after = model(**pack_docs(model, changed).model_inputs()).logits[0]
    bounds = pack_docs(model, docs).cu_seqlens.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        diff = (before[start:end] - after[start:end]).abs().max().item()
        if i == 2:
            assert diff > 1e-4, "the changed document's own logits must change"
        else:
            assert diff == 0.0, f"document {i} saw document 2's {change} (max diff {diff})"


def test_mismatched_placeholders_are_an_error(model, processor):
    config = model.config
    docs = make_docs(processor)
    d = docs[2]  # two images, so two runs of 16 placeholders
    n = image_seq_length(config)
    placeholders = np.flatnonzero(d.input_ids == config.image_token_id)
    cut = np.delete(np.arange(len(d)), placeholders[n - 3:n])  # the first image's run is 3 tokens short
    split = d.input_ids.copy()  # the right total (the model's own check passes) in runs of 5, 10 and 17
    split[placeholders[5]] = split[placeholders[0] - 1]
    split[placeholders[n] - 1] = config.image_token_id
    bad_docs = {
        "short run": Sample(d.input_ids[cut], d.loss_mask[cut], d.media),
        "one image missing": Sample(d.input_ids, d.loss_mask, {"pixel_values": d.media["pixel_values"][:1]}),
        "run split in two": Sample(split, d.loss_mask, d.media),
    }
    for case, bad in bad_docs.items():
        with pytest.raises(ValueError, match=r"placeholder runs .* need \d run\(s\) of 16"):
            pack_docs(model, [docs[1], bad])
            pytest.fail(f"{case} was packed")


def test_verify_passes_chameleon_and_its_negative_control_fails(model):
    from zeropad.verify import check_exactness

    report = check_exactness(model, [9, 14, 5, 11], seed=3)
    print(report.summary())
    assert report.passed and report.max_rel <= 1e-6, report.summary()
    # the logits themselves show the leak: the image-code logits Chameleon masks to the minimum are left out
    assert report.control is not None and report.control.logit_rel > 1e-3, report.summary()
