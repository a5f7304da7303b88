// pack: to be written
