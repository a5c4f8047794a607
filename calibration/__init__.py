"""Offline calibration of a model's KV codecs: `pdserve calibrate MODEL_DIR` (`calibration.calibrate`).

Not imported by the serving path: it runs the engine and reads the model's held-out text (training/), and
writes files that the runtime only reads (`kv_transfer.codec.CodecContext`, `kv_transfer.choice`).
"""
