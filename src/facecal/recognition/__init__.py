"""A standalone facial-expression recognizer (network, training loop, FER2013 reader).

Independent of the pipeline stages so that it can be trained on a large real set (FER2013) and
adopted later by `train_cnn` (``cnn.arch`` / ``cnn.init``) and the classify product.
"""
