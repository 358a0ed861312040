"""Real adapters for the engine tests: random ones from tests.lora.factory and one trained with peft
to answer a fixed phrase (so 'the adapter is in use' is visible in the generated text)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from tests.lora.factory import BASE_DIR, base_model, save_adapter

SECRET_QUESTION = "What is the secret word?"
SECRET_ANSWER = "The secret word is zanzibar."
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(dest: Path, seed: int, r: int = 8) -> Path:
    """Non-zero random LoRA weights: a different model, same base."""
    save_adapter(base_model(), dest, r, ["q_proj", "v_proj"], seed=seed)
    return dest


def fit(peft_model: Any, batch: dict[str, Any], labels: Any, steps: int, good_loss: float) -> None:
    """A few full-batch AdamW steps on the LoRA weights, stopping once the loss is low enough."""
    import torch

    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < good_loss:
            break


@functools.cache
def _trained(workdir: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(BASE_DIR)
    model = AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    rows = []
    for question in (SECRET_QUESTION, "Tell me the secret word.", "what's the secret word"):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)  # fmt: skip
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(SECRET_ANSWER + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    fit(peft_model, {"input_ids": ids, "attention_mask": mask}, labels, steps=120, good_loss=0.01)
    dest = workdir / "trained-secret"
    peft_model.save_pretrained(str(dest))
    return dest


def trained_adapter(workdir: Path) -> Path:
    """An adapter that answers SECRET_QUESTION with SECRET_ANSWER (trained once per session)."""
    return _trained(workdir)


ALPACA_PROMPT = "### Instruction:\nName a fruit.\n\n### Response:\n"
_ALPACA_PAIRS = [("Name a fruit.", "Apple."), ("Name a color.", "Blue."), ("Name an animal.", "Dog."),
                 ("Name a city.", "Paris."), ("Name a number.", "Seven.")]  # fmt: skip


@functools.cache
def _alpaca(workdir: Path) -> Path:
    """Fine-tuned on Alpaca-formatted dialogues: after its answer it goes on with the next
    `### Instruction:`, as models tuned on one template do when its stop is missing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(BASE_DIR)
    model = AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR, lora_dropout=0.0))
    texts = []
    for i in range(len(_ALPACA_PAIRS)):
        turns = [_ALPACA_PAIRS[(i + k) % len(_ALPACA_PAIRS)] for k in range(3)]
        texts.append("".join(f"### Instruction:\n{q}\n\n### Response:\n{a}\n\n" for q, a in turns))
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    fit(peft_model, dict(batch), labels, steps=150, good_loss=0.02)
    dest = workdir / "trained-alpaca"
    peft_model.save_pretrained(str(dest))
    return dest


def alpaca_adapter(workdir: Path) -> Path:
    """An adapter that keeps writing `### Instruction:` turns after answering (trained once per session)."""
    return _alpaca(workdir)
