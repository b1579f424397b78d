"""flowerapp: a Flower app that knows nothing of fedledger but two lines."""
