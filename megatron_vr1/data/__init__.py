"""Localization instruction data (no Megatron or SGLang imports; torch/transformers only where noted).

* ``schema``     the Vision-R1 row (problem, image, solution, width, height, num_instances, target_id_maps,
                 source), its validation (RowError names file, row, field) and ``VisionR1Row.to_sample``
* ``readers``    JSONL / parquet / HF save_to_disk sources, ``on_bad_row`` handling
* ``sampler``    streaming rank-sharded sampler, reshuffled per epoch, resumable
* ``dataset``    the training stream of Samples, per-epoch bad-row reports, ``model_inputs``
* ``image``      smart_resize and pixel patches identical to Qwen2.5-VL's processor
* ``image_check`` is a row's image there, decodable and of the row's size (data check and the dataset)
* ``prompts``    Table 8 templates (Qwen2.5-VL, Griffon), chat rendering, the SFT answer format
* ``converters`` COCO detection, ODinW grounding, RefCOCO REC rows and the paper's filters
* ``coco``       rows -> COCO ground truth, rows writers
* ``synth``      the procedural dataset (difficulty presets)
* ``check``      ``megatron-vr1 data check``
* ``tiny_model`` offline tokenizer/processor/random checkpoint (imports torch/transformers lazily)
"""
