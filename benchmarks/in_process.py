"""Environment for a benchmark that runs vLLM engines in its own process. Import it before
numpy, torch or vllm: they read these variables when first imported."""

import os

# vLLM trims torch to one thread for an in-process engine unless told otherwise.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
# Engines in this process, on the V1 model runner where the steering hooks live
# (docs/design.md#dependencies-and-platforms).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
