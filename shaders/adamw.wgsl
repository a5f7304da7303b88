// adamw: to be written
