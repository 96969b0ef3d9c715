"""Arithmetic: each engine's quantized conv emulated exactly (engines.py picks the kernel,
emulate.py and accumulate.py compute it, with qconvdiag/fp32.py's float32 steps), the float convs
(float_conv.py), torch's own runs (torch_ref.py) and the CPU probe (cpu.py)."""
