"""In-memory dataset for the multi-rank worker scripts, addressed by (index, epoch) keys like the real sources."""


class Table:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        return self.x[key[0]], self.y[key[0]]
