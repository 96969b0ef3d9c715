"""Case files: load and save ``.pt``/``.pth``, ``.npz`` and ``.safetensors``.

Untrusted files are never unpickled: ``torch.load(..., weights_only=True)`` and
``numpy.load(..., allow_pickle=False)``; safetensors has no code path at all.

Every format decodes into one flat mapping (``input``, ``weight``, ``bias``, ``stride``, ...,
``input_qparams`` ..., ``qinput``/``qweight`` codes, ``qconv.*`` module state), and
``validate.case_from_mapping`` builds the ConvCase from it, so the rules are the same for all
formats. In ``.npz`` and ``.safetensors`` files, non-tensor entries (geometry, qparams dicts)
are JSON text: a 0-d string array in ``.npz``, a metadata entry in ``.safetensors``.

Modules, in reading order: ``entries`` (formats, keys, quantized tensors, JSON entries),
``guards`` (the element guard, zip checks), one reader per format (``pt_reader``,
``npz_reader``, ``safetensors_reader``), ``read`` (a path to a mapping to a ConvCase),
``validate`` (the mapping -> ConvCase rule), ``write``, ``capture`` (from live modules) and
``calibration`` (``--calib`` data). ``qconvdiag.io`` is their public face.
"""
