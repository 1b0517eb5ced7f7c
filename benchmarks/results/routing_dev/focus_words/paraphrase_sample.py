"""Offline (#20): SmolLM2-135M-Instruct (the benchmark MLLM's language model, text only) asked to paraphrase
four edit questions, two domain-free instructions each (greedy). Usage: OMP_NUM_THREADS=1 python paraphrase_sample.py > paraphrase_sample.txt"""
import re, torch, sys
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer
from ldke_peft.bench.smol_llava import GGUF_FILE, _gguf_dir
f = _gguf_dir()
tok = AutoTokenizer.from_pretrained(f, gguf_file=GGUF_FILE)
m = AutoModelForCausalLM.from_pretrained(f, gguf_file=GGUF_FILE, dtype=torch.float32)
PROMPTS = ['Rewrite this question in five different ways, keeping its meaning: "{q}"\nOne per line.',
           'Paraphrase the question "{q}" five times. Each paraphrase must ask for exactly the same thing.']
for q in ["What is the capital of this country?", "What is the main language of this country?", "Which continent is this country in?", "What is the currency of this country?"]:
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p.format(q=q)}], add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor): ids = ids["input_ids"]
        with torch.no_grad():
            out = m.generate(ids, max_new_tokens=120, do_sample=False, repetition_penalty=1.2)
        print("==", q, "|", p[:20]); print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
