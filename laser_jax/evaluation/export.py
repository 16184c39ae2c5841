r"""Export a training checkpoint (or any loadable model) as a self-describing Hugging Face directory.

  python -m laser_jax.export --config=configs/eval.py \
      --config.model.checkpoint_dir=/tmp/laser_jax/tiny_cpu --config.export.output_dir=/tmp/laser_jax/tiny_cpu_hf

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained` and serves with vLLM.
Next to the weights it holds what the self-reward score needs, so that nobody has to know the run:
  laser_jax.json  z_c (token and id), beta_v, c_ref, whether the score is the exact one (log pi_ref
                  instead of c_ref) and against which reference, the EOS ids, and the prompt format
                  of training (template, instruction, chat template) -- `laser_metadata`;
  README.md       a model card saying how to read the score r_s = beta_v * (log pi(z_c | x, y, EOS) - c_ref),
                  with a transformers snippet and a vLLM recipe -- `model_card`.
A checkpoint's constants come from its training config; an HF model's from the eval config's
laser.* keys (or its own laser_jax.json), which must then be set. `laser_jax.evaluate
--config.model.hf_path=<dir>` reads laser_jax.json and scores exactly as it scores the checkpoint.
`--config.export.push_to_hub=org/name` uploads the directory with huggingface_hub.
"""
from __future__ import annotations

import json
import os

import jax
from absl import logging

from laser_jax.config_check import ConfigError
from laser_jax.data import prompts as prompts_lib
from laser_jax.evaluation import loading
from laser_jax.models import hf

METADATA_FORMAT = 1  # laser_jax.json's layout version
SCORE_FORMULA = "r_s = kl_coef * (log p(self_reward_token | prompt + response + EOS) - ref_constant)"

# The README's "Exporting for vLLM / the Hub" snippet, verbatim (tests/test_export.py checks both
# that the README holds exactly this and that it reproduces laser_jax.evaluate's scores); the model
# card carries it with MODEL set to the export.
SNIPPET_MODEL = "/tmp/laser_jax/tiny_cpu_hf"
SCORE_SNIPPET = r'''import json

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.utils import cached_file

MODEL = "/tmp/laser_jax/tiny_cpu_hf"  # a laser_jax.export directory, or its hub repo id
laser = json.load(open(cached_file(MODEL, "laser_jax.json")))
tokenizer = PreTrainedTokenizerFast.from_pretrained(MODEL)  # its tokenizer.json, exactly as trained
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def training_prompt(problem):
    """The prompt text of `problem` in the format the model was trained with."""
    fmt = laser["prompt"]
    content = problem + "\n" + fmt["instruction"]
    if fmt["template"] == "base":
        return content + "\n"
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True, chat_template=fmt["chat_template"])


@torch.no_grad()
def self_reward_scores(pairs):
    """r_s = beta_v * (log p(z_c | prompt + response + EOS) - c_ref) of (prompt, response) texts."""
    add_bos = laser["prompt"]["template"] == "base"  # a chat template writes its own BOS
    scores = []
    for prompt, response in pairs:
        ids = (tokenizer(prompt, add_special_tokens=add_bos).input_ids
               + tokenizer(response, add_special_tokens=False).input_ids + [laser["eos_token_id"]])
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        logprob = torch.log_softmax(logits, dim=-1)[laser["self_reward_token_id"]].item()
        scores.append(laser["kl_coef"] * (logprob - laser["ref_constant"]))
    return scores


prompt = training_prompt("What is 2 + 3?")
print(self_reward_scores([(prompt, "2 + 3 = 5, so the answer is \\boxed{5}.")]))  # > 0.5: "correct"
'''


def score_snippet(model: str) -> str:
  """`SCORE_SNIPPET` reading the export at `model` (a directory or a hub repo id)."""
  return SCORE_SNIPPET.replace(json.dumps(SNIPPET_MODEL), json.dumps(model), 1)


def laser_metadata(model: loading.LoadedModel) -> dict:
  """The laser_jax.json of `model`: everything its self-reward score and prompts need."""
  tokenizer = model.tokenizer
  eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.eos_ids[0]
  chat_template = tokenizer.chat_template if model.template == "chat" else None
  return {
      "laser_jax_format": METADATA_FORMAT,
      "score": SCORE_FORMULA,
      "self_reward_token": tokenizer.convert_ids_to_tokens(model.zc_id),  # z_c
      "self_reward_token_id": model.zc_id,
      "kl_coef": model.kl_coef,  # beta_v
      # c_ref; null when the score is the exact one: log pi_ref(z_c | x, y, EOS) of reference_model.
      "ref_constant": None if model.use_ref_model_score else model.ref_constant,
      "use_ref_model_score": model.use_ref_model_score,
      # pi_ref's HF directory or hub id ("" = none, or the initial policy of a random-init run).
      "reference_model": model.reference_model,
      # The EOS that ends a response (the chat model's end of turn); any of eos_token_ids ends one.
      "eos_token_id": int(eos_id),
      "eos_token_ids": [int(i) for i in model.eos_ids],
      "prompt": {
          "template": model.template,  # "chat" | "base" (data.build_prompt)
          "instruction": prompts_lib.INSTRUCTION,  # appended to the problem after a newline
          "chat_template": chat_template,  # the tokenizer's, as used in training (null for "base")
      },
      "source": model.source,  # the checkpoint (or HF model) this was exported from
      "constants_source": model.constants_source,
      "overridden_constants": list(model.overrides),
  }


def model_card(metadata: dict, model_ref: str) -> str:
  """The export's README.md: what the model is and how to read its self-reward score."""
  m, fmt = metadata, metadata["prompt"]
  title = model_ref if not os.path.isabs(model_ref) else os.path.basename(os.path.normpath(model_ref))
  if m["use_ref_model_score"]:
    offset = (f"log pi_ref(z_c | x, y, EOS) of the reference model `{m['reference_model'] or 'the initial policy'}` "
              f"(the exact score: one forward of that model over the same ids)")
  else:
    offset = f"c_ref = {m['ref_constant']!r}"
  exact_note = ("; for this model's exact score, subtract the reference model's log-prob, computed the "
                "same way, instead of c_ref" if m["use_ref_model_score"] else "")
  prompt = ("the tokenizer's chat template (recorded in laser_jax.json) with one user turn "
            "`problem + \"\\n\" + instruction` and the generation prompt" if fmt["template"] == "chat"
            else "plain text `problem + \"\\n\" + instruction + \"\\n\"`")
  return f"""---
library_name: transformers
tags:
- laser
- self-rewarding
- self-verification
- laser_jax
---

# {title}

A model trained with LaSeR (reinforcement learning with last-token self-rewarding) with
laser_jax, exported from `{m['source']}`. It solves a problem and, for one extra token, scores its
own solution.

## Reading the self-reward score

After a response `y` to prompt `x` ends with EOS, the log-probability the model gives the token
z_c next is its verdict:

    r_s = beta_v * (log p(z_c | x, y, EOS) - {'log pi_ref(z_c | x, y, EOS)' if m['use_ref_model_score'] else 'c_ref'})

| constant | value |
|---|---|
| z_c (`self_reward_token`, `self_reward_token_id`) | `{_table_cell(m['self_reward_token'])}`, id {m['self_reward_token_id']} |
| beta_v (`kl_coef`) | {m['kl_coef']!r} |
| offset | {offset} |
| EOS appended after the response (`eos_token_id`) | {m['eos_token_id']} (any of {m['eos_token_ids']} ends a response) |
| prompt format (`prompt.template`) | {fmt['template']}: {prompt} |
| instruction (`prompt.instruction`) | `{fmt['instruction']}` |

All of them are in `laser_jax.json`. r_s near 1 means the model judges the solution correct, near 0
incorrect; 0.5 is the threshold of the self-verification metrics. The score is only meaningful at
temperature 1 (raw logits) and for prompts in the training format above.

With transformers (one forward over `prompt + response + EOS`, read at the last position{exact_note}):

```python
{score_snippet(model_ref)}```

With vLLM (untested until a GPU run checks it): asking for one more token's `logprobs` returns
only the top-k tokens, which need not contain z_c. Append z_c to the sequence instead and ask for
`prompt_logprobs`; the entry of the last prompt position is log p(z_c | x, y, EOS):

```python
from vllm import LLM, SamplingParams

llm = LLM(MODEL)
ids = prompt_ids + response_ids + [laser["eos_token_id"], laser["self_reward_token_id"]]
out = llm.generate({{"prompt_token_ids": ids}}, SamplingParams(max_tokens=1, prompt_logprobs=0))
logprob = out[0].prompt_logprobs[-1][laser["self_reward_token_id"]].logprob
r_s = laser["kl_coef"] * (logprob - laser["ref_constant"])
```

Here `response_ids` are a response's tokens without its EOS (a vLLM output's `token_ids` end with
the EOS it stopped on: append only z_c to those). `python -m laser_jax.evaluate
--config=configs/eval.py --config.model.hf_path=<this directory>` samples, verifies and scores with
these constants.
"""


def _table_cell(text: str) -> str:
  """`text` inside a markdown table cell: a pipe would end the cell, even in a code span."""
  return text.replace("|", "\\|")


def push_to_hub(out_dir: str, repo_id: str, private: bool = False) -> str:
  """Uploads `out_dir` to the hub repo `repo_id` (created if missing); returns the repo URL."""
  from huggingface_hub import HfApi
  api = HfApi()
  try:
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=out_dir, repo_id=repo_id, repo_type="model",
                      commit_message="Upload laser_jax export")
  except Exception as e:  # auth, network, permissions: huggingface_hub raises many types
    raise ConfigError(f"config.export.push_to_hub: cannot upload {out_dir} to {repo_id}: "
                      f"{' '.join(str(e).split())[:300]} (the export is complete there; retry with "
                      f"`hf upload {repo_id} {out_dir}`)") from None
  return str(url)


def _check_push_target(repo_id: str) -> None:
  """Bad hub targets fail before anything is loaded or written."""
  from huggingface_hub import constants, get_token
  from huggingface_hub.utils import HFValidationError, validate_repo_id
  try:
    validate_repo_id(repo_id)
  except HFValidationError as e:
    raise ConfigError(f"config.export.push_to_hub: {repo_id!r} is not a hub repo id ({e})") from None
  if "/" not in repo_id:
    raise ConfigError(f"config.export.push_to_hub: expected 'org/name', got {repo_id!r}")
  if constants.HF_HUB_OFFLINE:
    raise ConfigError(f"config.export.push_to_hub: HF_HUB_OFFLINE is set; cannot upload to {repo_id}")
  if get_token() is None:
    raise ConfigError(f"config.export.push_to_hub: no Hugging Face token to upload to {repo_id} "
                      f"(run `hf auth login` or set HF_TOKEN)")


def run(config) -> str:
  """Loads `config.model` as the evaluator does and writes `config.export.output_dir` (weights,
  tokenizer, laser_jax.json, README.md); uploads it when `config.export.push_to_hub` is set."""
  e = config.export
  if not e.output_dir:
    raise ConfigError("config.export.output_dir: set the directory to write the HF model to")
  if e.dtype not in ("bfloat16", "float32"):
    raise ConfigError(f"config.export.dtype: expected 'bfloat16' or 'float32', got {e.dtype!r}")
  if e.push_to_hub:
    _check_push_target(e.push_to_hub)
  model = loading.load_model(config, reference=False)  # the constants, not pi_ref's weights
  metadata = laser_metadata(model)
  if metadata["use_ref_model_score"] and not metadata["reference_model"]:
    logging.warning("The run scored against its initial policy (exact score), which is not part of the "
                    "export: evaluating it needs config.laser.ref_hf_path (or config.laser.ref_constant)")
  hf.export_hf(model.params, model.cfg, e.output_dir, tokenizer=model.tokenizer, dtype=e.dtype,
               eos_token_ids=model.eos_ids)
  hf.write_laser_metadata(e.output_dir, metadata)
  if jax.process_index() == 0:
    with open(os.path.join(e.output_dir, "README.md"), "w") as f:
      f.write(model_card(metadata, e.push_to_hub or e.output_dir))
    if e.push_to_hub:
      push_to_hub(e.output_dir, e.push_to_hub, private=e.hub_private)
  return e.output_dir

