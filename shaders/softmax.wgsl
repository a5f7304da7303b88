// softmax: to be written
