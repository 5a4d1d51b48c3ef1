"""Run inside vLLM's environment (scripts/setup_vllm.sh): greedy tokens of a base model with a LoRA adapter.

    python tests/vllm_greedy.py MODEL_DIR ADAPTER_DIR MAX_TOKENS PROMPT_IDS_JSON   -> "GREEDY <JSON token lists>" on stdout
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: a tiny model's cache, on a machine shared with others
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest


def main() -> None:
    model, adapter, max_tokens, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    llm = LLM(model=model, dtype="float32", max_model_len=256, enable_lora=True, max_lora_rank=8, max_loras=1,
              enforce_eager=True, seed=0,
              gpu_memory_utilization=0.3)  # on CPU: the share of memory vLLM may reserve
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        lora_request=LoRARequest("export", 1, adapter))
    print("GREEDY", json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)  # vLLM logs to stdout too


if __name__ == "__main__":  # vLLM spawns its engine core, which imports this module again
    main()
