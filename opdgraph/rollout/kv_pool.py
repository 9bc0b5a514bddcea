"""Page accounting for the paged KV cache: a free list and a reference count per page (pure python, no tensors).

The KV tensors themselves (per layer [2, num_pages, page_size, kv_heads, head_dim]) are owned by the engine; this
module only decides which page ids are in use. A page is shared when several sequences list it in their page table
(the n samples of one prompt share the prompt's pages); it returns to the free list when its last holder lets go.

``check_page_accounting`` is the one invariant checker the tests run after any mix of finish / preempt / resume.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable


class PagePool:
    """Hands out page ids in [0, num_pages) and tracks how many sequences hold each one."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.refcounts = [0] * num_pages
        # Popping from the end hands out low page ids first, which keeps small runs easy to read in a debugger.
        self.free_pages = list(range(num_pages - 1, -1, -1))
        self.peak_pages_used = 0

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self.free_pages)

    def allocate(self) -> int:
        page = self.free_pages.pop()
        self.refcounts[page] = 1
        self.peak_pages_used = max(self.peak_pages_used, self.num_used)
        return page

    def share(self, page: int) -> None:
        """One more sequence now lists ``page``."""
        self.refcounts[page] += 1

    def release(self, page: int) -> None:
        """One sequence stops listing ``page``; the last one returns it to the free list."""
        self.refcounts[page] -= 1
        if self.refcounts[page] == 0:
            self.free_pages.append(page)

    def is_shared(self, page: int) -> bool:
        return self.refcounts[page] > 1


def check_page_accounting(pool: PagePool, page_tables: Iterable[list[int]]) -> None:
    """Raise AssertionError unless the pool agrees exactly with the page tables of all live sequences.

    Checks: every listed page has a refcount equal to the number of tables listing it (none leaked, none
    double-freed); a page sits in the free list iff nobody holds it, at most once; free + used = total; no table
    lists the same page twice.
    """
    holders: Counter[int] = Counter()
    for table in page_tables:
        assert len(set(table)) == len(table), f"a page table lists a page twice: {table}"
        holders.update(table)
    free = Counter(pool.free_pages)
    duplicated = [page for page, count in free.items() if count > 1]
    assert not duplicated, f"pages in the free list more than once (double free): {duplicated}"
    for page in range(pool.num_pages):
        assert pool.refcounts[page] == holders[page], (
            f"page {page}: refcount {pool.refcounts[page]} but {holders[page]} sequences hold it"
        )
        assert (page in free) == (holders[page] == 0), (
            f"page {page}: {'free' if page in free else 'not free'} but held by {holders[page]} sequences"
        )
    assert pool.num_free + len(holders) == pool.num_pages, "free + used pages != total pages"
