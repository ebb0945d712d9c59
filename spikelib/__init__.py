"""spikelib: activation spikes in GLU language models and the QFeM and QFeP fixes.

Companion code for "Mitigating Quantization Errors Due to Activation Spikes in GLU-Based
LLMs" (Yang, Kim and Kim, 2024, arXiv:2405.14428).
"""

__version__ = "0.1.0"
