"""`zeropad chat` fed from stdin and `zeropad generate` on a tiny text model and a tiny vision-language model.
(The trained default run's final/ is scored through `zeropad generate` in test_default_run.py.)"""

import json

import torch
from PIL import Image
from tinymodels import tiny_model
from tinyvideo import write_video
from tinyvlm import vlm_run
from typer.testing import CliRunner

from zeropad.cli import app
from zeropad.config import build_config
from zeropad.data.formats import Conversation, Message
from zeropad.demo.tokenizer import IMAGE_PAD_TOKEN, VIDEO_PAD_TOKEN, build_tokenizer
from zeropad.generate import Prompt, Settings, load_chatter
from zeropad.train.loop import train


def _text_model(root):
    tokenizer = build_tokenizer(root)
    model = tiny_model("qwen3", attn_implementation="sdpa", vocab_size=len(tokenizer),
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(root)
    return root


def _reply(chatter, *messages) -> str:
    prompt = Prompt(Conversation(tuple(Message(role, content) for role, content in messages)))
    return chatter.generate(chatter.inputs(prompt), Settings(max_new_tokens=6))[0]


def test_chat_streams_replies_keeps_history_and_resets(tmp_path, one_thread):
    model_dir = _text_model(tmp_path / "model")
    result = CliRunner().invoke(app, ["chat", str(model_dir), "--system", "Be brief.", "--max-new-tokens", "6",
                                      "--device", "cpu"], input="hello\nagain\n/reset\nhello\n/exit\nnever\n")
    assert result.exit_code == 0, result.output
    chatter = load_chatter(model_dir, "cpu")
    first = _reply(chatter, ("system", "Be brief."), ("user", "hello"))
    second = _reply(chatter, ("system", "Be brief."), ("user", "hello"), ("assistant", first), ("user", "again"))
    assert first and second
    # The second turn sees the first; after /reset the same question gets the first answer again; /exit stops.
    assert result.stdout == (f"chat: /reset clears the history, /exit quits\n> {first}\n> {second}\n"
                             f"> (history cleared)\n> {first}\n> ")


def test_chat_samples_with_a_seed(tmp_path, one_thread):
    """`--seed` makes a sampled conversation repeat (chat had no seed: README promised one)."""
    model_dir = _text_model(tmp_path / "model")

    def run(seed: str) -> str:
        result = CliRunner().invoke(app, ["chat", str(model_dir), "--max-new-tokens", "12", "--temperature", "1.5",
                                          "--seed", seed, "--device", "cpu"], input="hello\nagain\n/exit\n")
        assert result.exit_code == 0, result.output
        return result.stdout

    first = run("1")
    assert run("1") == first != run("2")


def test_generate_samples_with_a_seed_and_greedy_ignores_it(tmp_path, one_thread):
    model_dir = _text_model(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "yo"}) + "\n")

    def run(*options) -> list[str]:
        out = tmp_path / "out.jsonl"
        result = CliRunner().invoke(app, ["generate", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                                          "--max-new-tokens", "12", "--device", "cpu", "--no-progress", *options])
        assert result.exit_code == 0, result.output
        return [json.loads(line)["response"] for line in out.read_text().splitlines()]

    greedy = run()
    assert run("--seed", "3") == greedy
    sampled = run("--temperature", "1.5", "--seed", "1")
    assert run("--temperature", "1.5", "--seed", "1") == sampled != greedy


def test_vlm_chat_and_generate_see_the_image_as_training_does(tmp_path, one_thread):
    Image.new("RGB", (60, 40), (200, 30, 30)).save(tmp_path / "a.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>What colour?"},
                                              {"role": "assistant", "content": "red"}], "images": ["a.png"]}]))
    cfg = build_config(vlm_run(tmp_path, data, train={"steps": 1}))
    train(cfg)
    final = tmp_path / "out" / "final"
    chatter = load_chatter(final, "cpu")
    inputs = chatter.inputs(Prompt(Conversation((Message("user", "<image>What colour?"),)), [str(tmp_path / "a.png")]))
    # The prompt is the generation prompt, its one image pad expanded to the image's visual tokens.
    pad = chatter.tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN)
    ids = inputs["input_ids"][0].tolist()
    rendered = chatter.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<|vision_start|>{IMAGE_PAD_TOKEN}<|vision_end|>What colour?"}],
        tokenize=False, add_generation_prompt=True)
    collapsed = [t for i, t in enumerate(ids) if t != pad or ids[i - 1] != pad]
    assert collapsed == chatter.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(pad) == int(inputs["image_grid_thw"].prod()) // 4 > 1  # 2x2 merge
    assert torch.is_tensor(inputs["pixel_values"])

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "<image>What colour?"}],
                                   "images": ["a.png"]}) + "\n")
    out = tmp_path / "gen.jsonl"
    gen = CliRunner().invoke(app, ["generate", str(final), "--prompts", str(prompts), "--out", str(out),
                                   "--max-new-tokens", "4", "--device", "cpu", "--no-progress"])
    assert gen.exit_code == 0, gen.output
    response = json.loads(out.read_text())["response"]
    assert response == chatter.generate(inputs, Settings(max_new_tokens=4))[0]
    chat = CliRunner().invoke(app, ["chat", str(final), "--image", str(tmp_path / "a.png"), "--max-new-tokens", "4",
                                    "--device", "cpu"], input="What colour?\n")
    assert chat.exit_code == 0, chat.output
    assert chat.stdout.endswith(f"> {response}\n> ")

    # A video goes the same way (the run's video settings: at most 4 frames, 2 x 4 visual tokens).
    write_video(tmp_path / "v.mp4")
    clip = chatter.inputs(Prompt(Conversation((Message("user", "<video>What happens?"),)), videos=["v.mp4"],
                                 file=str(prompts)))
    assert clip["input_ids"][0].tolist().count(chatter.tokenizer.convert_tokens_to_ids(VIDEO_PAD_TOKEN)) == int(
        clip["video_grid_thw"].prod()) // 4 > 1
    chat = CliRunner().invoke(app, ["chat", str(final), "--video", str(tmp_path / "v.mp4"), "--max-new-tokens", "4",
                                    "--device", "cpu"], input="What happens?\n")
    assert chat.exit_code == 0, chat.output
    assert chat.stdout.endswith(f"> {chatter.generate(clip, Settings(max_new_tokens=4))[0]}\n> ")


def test_chat_template_kwargs_reach_the_prompt_and_bad_json_is_named(tmp_path):
    import sys
    from pathlib import Path

    from zeropad.config import VideoConfig
    from zeropad.errors import ConfigError
    from zeropad.generate import Chatter

    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from chat_templates import QWEN3, char_tokenizer

    tokenizer = char_tokenizer(QWEN3, None, "<|im_end|>")
    prompt = Prompt(Conversation((Message("user", "2+2?"),)))
    for kwargs, end in (({}, "<|im_start|>assistant\n"), ({"enable_thinking": False}, "</think>\n\n")):
        ids = Chatter(None, tokenizer, None, VideoConfig(), kwargs).inputs(prompt)["input_ids"][0].tolist()
        assert tokenizer.decode(ids).endswith(end)
    # Tools with a ChatML template that has none: the prompt is built with the built-in template training used.
    plain = build_tokenizer(tmp_path / "tok")
    spec = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    tools = Prompt(Conversation((Message("user", "Weather?"),), (spec,)))
    text = plain.decode(Chatter(None, plain, None, VideoConfig()).inputs(tools)["input_ids"][0].tolist())
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert text.endswith("<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n")
    result = CliRunner().invoke(app, ["chat", str(tmp_path), "--chat-template-kwargs", "{bad"])
    assert isinstance(result.exception, ConfigError) and "--chat-template-kwargs" in str(result.exception)
