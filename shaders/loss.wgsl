// loss: to be written
