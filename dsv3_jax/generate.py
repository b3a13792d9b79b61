def generate(*a, **k):
    raise NotImplementedError
