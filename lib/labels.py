"""Class names, in one place: the folder labels, the three causes and the Grad-CAM targets.

Usage: `labels.CLASSES[1] == "PNEUMONIA"`. Every other module reads the names from here.
"""
CLASSES = ("NORMAL", "PNEUMONIA")  # label = index: NORMAL=0, PNEUMONIA=1
CAUSES = ("NORMAL", "BACTERIAL", "VIRAL")  # --task cause: class = index; -1 where a pneumonia file's name says neither
CLASS_COLUMNS = tuple(f"p_{c.lower()}" for c in CAUSES)  # a cause model's extra predictions.csv columns
# what Grad-CAM can explain: each is a log-odds with an opposite (gradcam.target_score); the last two need --task cause
CAM_TARGETS = ("pneumonia", "normal", "bacterial", "viral")
# --groups' default: the Kaggle file names' series, which follow acquisition periods (docs/generalisation.md)
SERIES_PATTERN = r"^(NORMAL2-IM|IM|person)"
# said by predict, evaluate and the ONNX runtime for a checkpoint trained with --demo
DEMO_CHECKPOINT = "trained on synthetic phantoms: its calls on real films mean nothing"
DEMO_WARNING = f"WARNING: this checkpoint was {DEMO_CHECKPOINT}."  # above the calls, on the terminal and the page
