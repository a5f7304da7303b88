// noise: to be written
