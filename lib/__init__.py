"""What the pipeline files (data, model, train, evaluate, gradcam) are built from: decoding and the decode cache,
transforms and augmentation, inference, input checks (ood), the shortcut probe, run folders and checkpoints,
precision, the process group, progress and the small shared names. A module here imports only others here and
model.py; never a pipeline file above it, never app/ (tests/test_model_train.py checks the rule)."""
