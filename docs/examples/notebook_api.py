"""The notebook API end to end: load a meta-model, evaluate, adapt, predict, save.

Run it with a run directory (or checkpoint) and a site's data:

    python docs/examples/notebook_api.py runs/demo builtin:demo/site-3
"""

import sys
import tempfile

import medmeta

run_dir, data = sys.argv[1], sys.argv[2]

meta = medmeta.load(run_dir)

# Episodic few-shot accuracy: the number a new site can expect (mean, 95% interval).
result = meta.evaluate(data, ways=3, shots=5, episodes=50)
print(f"3-way 5-shot: {result.accuracy_mean:.3f} ± {result.accuracy_ci95:.3f}")

# Adapt from 5 labelled images per class, then measure on all labelled images.
classifier = meta.adapt(task="classification", data=data, shots=5)
print("classes:", classifier.classes)
print("accuracy on the labelled set:", classifier.evaluate(data)["accuracy"])

# Save for `medmeta predict --model DIR`, load it back, and predict.
with tempfile.TemporaryDirectory() as folder:
    classifier.save(folder)
    again = medmeta.load_classifier(folder)
    import numpy as np

    images = np.random.default_rng(0).random((2, 48, 48)).astype("float32")
    for prediction in again.predict(images):
        print(prediction.file, prediction.label, max(prediction.probabilities))
