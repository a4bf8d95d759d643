"""Invariants 2-3 for Emu3 image generation: text-to-image and interleaved records, whose images become their VQ
tokens as targets in Emu3's own layout, packed into one pack, equal each document alone (unpadded HF forward and
backward) in loss, logits and gradients; the negative control fails. Images have different sizes, so their code
grids (and row lengths) differ."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinyemu3 import SIDE, emu3_config, emu3_processor, emu3_tokenizer, text_to_image_records, write_image
from tinyvlm import CHAMELEON_TOKENS, _chameleon
from zeropad.config import ModelConfig
from zeropad.data.chat import ensure_chat_template
from zeropad.data.image_targets import read_target_record, to_target_doc
from zeropad.data.sources import iter_records
from zeropad.data.vision import read_image_conversation
from zeropad.demo.tokenizer import build_tokenizer
from zeropad.errors import DataError
from zeropad.family import image_targets
from zeropad.model.emu3 import image_encoder
from zeropad.model.load import build_model
from zeropad.pack.collate import IGNORE_INDEX, collate
from zeropad.verify import FLOAT64_TOLERANCE, TOLERANCE, check_documents


@pytest.fixture(scope="module")
def emu3(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu3")
    tokenizer = emu3_tokenizer(root / "tokenizer")
    ensure_chat_template(tokenizer, None)
    model = build_model(ModelConfig(config=emu3_config(tokenizer), tokenizer=str(root / "tokenizer")), seed=0)
    data = text_to_image_records(root)
    # interleaved: text, an image, more text and a second image in one assistant turn
    second = write_image(root / "second.png", 48, 20, seed=9)
    with data.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "two pictures please"},
                                         {"role": "assistant", "content": "here <image> and <image> done"}],
                            "images": ["img1.png", second]}) + "\n")
    processor = emu3_processor()
    samples = [read_target_record(record, tokenizer, model.config, processor, file=str(data), record_no=n)
               for n, record in iter_records(data)]
    targets = image_targets(model.config)
    docs = [to_target_doc(s, processor, image_encoder(model), targets) for s in samples]
    return SimpleNamespace(root=root, tokenizer=tokenizer, model=model, processor=processor, data=data,
                           samples=samples, docs=docs, targets=targets)


def test_image_tokens_are_targets_in_emu3_layout_and_the_prompt_is_not(emu3):
    tok, model, targets = emu3.tokenizer, emu3.model, emu3.targets
    assert len({s.grids for s in emu3.samples}) > 2  # different image sizes, different grids
    for sample, doc in zip(emu3.samples, emu3.docs):
        assert len(sample) == len(doc)  # the length planned from image headers is the document's
    sample, doc = emu3.samples[0], emu3.docs[0]  # a 32 x 32 image: 4 x 4 codes
    (rows, cols), = sample.grids
    assert (rows, cols) == (SIDE // 8, SIDE // 8)
    prefix = tok(targets.prefix_text(rows, cols), add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(doc)) if doc.input_ids[i:i + len(prefix)].tolist() == prefix) + len(prefix)
    end = start + targets.num_body_tokens(rows, cols)
    assert not doc.loss_mask[:start].any()  # the user's prompt, the assistant header and the image prefix
    assert doc.loss_mask[start:end].all()  # every visual token, end of line, end of frame and end of image
    body = torch.as_tensor(doc.input_ids[start:end])
    assert body[cols::cols + 1][:rows].eq(targets.eol_id).all() and body[-2:].tolist() == [targets.eof_id,
                                                                                        targets.eoi_id]
    assert doc.input_ids[end] == tok.eos_token_id and doc.loss_mask[end]  # the end of turn: stop after it
    # Emu3's own decoder reads the layout back: the codes are the VQ model's own for this image
    pixels = emu3.processor(images=[__import__("PIL.Image").Image.open(sample.image_paths[0])],
                            return_tensors="pt")
    codes = model.model.vqmodel.encode(pixels["pixel_values"], pixels["image_sizes"]).image_tokens[0]
    read_back = model.vocabulary_mapping.convert_bpe2img(body[:rows * (cols + 1)].view(rows, cols + 1))
    assert torch.equal(read_back.long(), codes.long())
    image = model.decode_image_tokens(image_tokens=torch.cat([body, torch.tensor([tok.eos_token_id])])[None],
                                      height=rows, width=cols)
    assert image.shape == (1, 3, SIDE, SIDE)
    # the interleaved record: text targets around two images, each with its own non-target prefix
    two = emu3.docs[-1]
    assert len(emu3.samples[-1].grids) == 2
    assert (two.input_ids == targets.eoi_id).sum() == 2 and two.loss_mask[two.input_ids == targets.eoi_id].all()
    assert (two.input_ids == targets.eol_id).sum() == sum(r for r, _ in emu3.samples[-1].grids)


def test_packed_loss_and_gradients_equal_each_document_alone(emu3):
    model, docs = emu3.model, emu3.docs
    for dtype, bound in ((torch.float64, FLOAT64_TOLERANCE), (torch.float32, TOLERANCE)):
        report = check_documents(model, docs, dtype=dtype, tolerance=bound)
        print(report.summary())
        assert report.passed, report.summary()
        assert report.control is not None and report.control.logit_rel > 1e-3, report.summary()
    # The loss itself, packed (the training path's targets) against Hugging Face's own loss per document
    model.eval()
    with torch.no_grad():
        pack = collate(docs, None)
        logits = model(**pack.model_inputs()).logits[0]
        packed = F.cross_entropy(logits, pack.target_ids[0], ignore_index=IGNORE_INDEX, reduction="sum")
        model.set_attn_implementation("eager")
        reference = 0.0
        for doc in docs:
            ids = torch.as_tensor(doc.input_ids, dtype=torch.long)[None]
            labels = torch.where(torch.as_tensor(doc.loss_mask), ids, IGNORE_INDEX)
            n = int((labels[0, 1:] != IGNORE_INDEX).sum())
            reference += model(input_ids=ids, labels=labels).loss.item() * n
        model.set_attn_implementation({"text_config": "zeropad_varlen", "vq_config": "sdpa"})
    print(f"loss: packed {packed.item():.6f} reference {reference:.6f}")
    assert pack.num_targets == sum(int(d.loss_mask[1:].sum()) for d in docs)
    assert abs(packed.item() - reference) <= TOLERANCE * abs(reference)


def test_bad_records_are_named(emu3, tmp_path):
    tok, model, processor = emu3.tokenizer, emu3.model, emu3.processor
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    write_image(tmp_path / "ok.png", 32, 32)

    def record(content="<image>", images=("ok.png",), user="a cat"):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": content}],
                "images": list(images)}

    cases = {
        "missing.png": (record(images=["missing.png"]), r"image 1 of 1 \('missing.png'.*no such file"),
        "broken.png": (record(images=["broken.png"]), r"image 1 of 1 \('broken.png'.*not an image"),
        "user turn": (record(user="<image> like this", content="<image>", images=["ok.png", "ok.png"]),
                      r"an image in a user turn.*understanding inputs are not supported"),
        "count": (record(content="<image> <image>"), r"2 <image> placeholder\(s\).*1 image\(s\)"),
    }
    for case, (bad, message) in cases.items():
        with pytest.raises(DataError, match=message) as err:
            read_target_record(bad, tok, model.config, processor, file=str(tmp_path / "d.jsonl"), record_no=7)
            pytest.fail(f"{case} was accepted")
        assert err.value.file.endswith("d.jsonl") and err.value.record == 7
    # Chameleon cannot decode its VQ tokens in transformers: an image to generate is refused
    from transformers import AutoConfig

    chameleon_tok = build_tokenizer(tmp_path / "ctok")
    chameleon_tok.add_special_tokens({"additional_special_tokens": CHAMELEON_TOKENS})
    settings = _chameleon(chameleon_tok)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    with pytest.raises(DataError, match="chameleon cannot learn .*no decoder for its VQ image tokens"):
        read_image_conversation(record(), chameleon_tok, config, file=str(tmp_path / "d.jsonl"), record_no=1)


def test_image_targets_refuse_an_incomplete_vocabulary(emu3):
    config = emu3.model.config
    broken = {k: v for k, v in config.vocabulary_map.items() if k != "<|extra_200|>"}
    with pytest.raises(ValueError, match="extra_200"):
        image_targets(SimpleNamespace(model_type="emu3", vocabulary_map=broken, vq_config=config.vq_config))
    assert image_targets(SimpleNamespace(model_type="chameleon")) is None
    assert np.array_equal(emu3.targets.visual_ids, sorted(config.vocabulary_map[f"<|visual token {k:06d}|>"]
                                                          for k in range(32)))
