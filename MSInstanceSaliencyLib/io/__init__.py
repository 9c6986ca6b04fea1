"""Reading and writing: volumes, and every safe write of the project (staging folders, atomic files, locks, manifests,
user-file protection). The lowest layer above errors/progress."""
