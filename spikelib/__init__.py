"""spikelib: activation spikes in GLU language models and the QFeM and QFeP fixes.

Companion code for "Mitigating Quantization Errors Due to Activation Spikes in GLU-Based
LLMs" (Yang, Kim and Kim, 2024, arXiv:2405.14428).
"""

__version__ = "0.1.0"

import logging as _logging

# transformers imports torchao, when installed, while it loads any model. torchao 0.18 then logs
# that its CUDA-only kernels do not load and that torch deprecates one of its registrations:
# noise on every load, whatever the model. Quieted here unless a level was set for these loggers.
for _name in ("torchao", "torch.utils._pytree"):
    if _logging.getLogger(_name).level == _logging.NOTSET:
        _logging.getLogger(_name).setLevel(_logging.ERROR)
