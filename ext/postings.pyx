# cython: language_level=3, embedsignature=True
# distutils: language = c++
"""Blacklight's inverted index in flat arrays: hash -> ascending query ids.

Semantics are those of :class:`guard._py.postings.PostingIndex` (its module docstring
states them); after every operation this index holds the same postings as its twin, and
:meth:`PostingIndex.shared` returns the same result. Every hash indexed has one slot in
an open-addressing table (a power of two of slots, at most half full, linear probing
from the hash's low bits, deletion by backward shift: no tombstones): most hashes belong
to one query, whose id the slot holds; a hash shared by several queries is marked
``MANY`` there and its ids live in ``multi`` (a vector each). A lookup costs one probe
sequence in one array, usually one cache line, and a hash no query holds is answered
there too, without a second map. The hashes are keyed ``fmix64`` outputs (uniform
without the key), so their low bits spread the slots. A lookup, an insert and a removal
are each one pass over the fingerprint's hashes without touching Python objects.
"""

cimport cython
from cython.operator cimport dereference as deref
from libc.stdint cimport int64_t, uint64_t
from libcpp.algorithm cimport sort
from libcpp.pair cimport pair
from libcpp.unordered_map cimport unordered_map
from libcpp.utility cimport move
from libcpp.vector cimport vector

from array import array

import numpy as np

ctypedef unordered_map[uint64_t, vector[int64_t]].iterator multi_it

cdef enum:
    EMPTY = 0
    SINGLE = 1  # the slot's value is the one id indexed under its hash
    MANY = 2  # the ids are in ``multi``
    FIRST_SLOTS = 16


cdef struct Slot:
    uint64_t key
    int64_t value
    int state


cdef class PostingIndex:
    cdef vector[Slot] slots  # a power of two of them, at most half in use
    cdef size_t used
    cdef unordered_map[uint64_t, vector[int64_t]] multi
    cdef unordered_map[int64_t, int] counts  # shared(): reused, so no allocation per call

    def __cinit__(self):
        self.slots.resize(FIRST_SLOTS)
        self.used = 0

    def __len__(self):
        return self.used

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def add(self, hashes, int64_t qid, Py_ssize_t max_per_hash):
        """Index query ``qid`` (larger than every id indexed) under each of ``hashes``."""
        cdef const uint64_t[::1] h = _hashes(hashes)
        cdef Py_ssize_t i
        with nogil:
            for i in range(h.shape[0]):
                self._add(h[i], qid, max_per_hash)

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def remove(self, hashes, int64_t qid):
        """Forget query ``qid`` under each of ``hashes`` (where it is still indexed)."""
        cdef const uint64_t[::1] h = _hashes(hashes)
        cdef Py_ssize_t i
        with nogil:
            for i in range(h.shape[0]):
                self._remove(h[i], qid)

    def postings(self, h):
        """The ids indexed under ``h``, ascending."""
        cdef uint64_t key = <uint64_t>int(h)
        cdef Py_ssize_t i = self._find(key)
        if i < 0:
            return []
        if self.slots[i].state == SINGLE:
            return [self.slots[i].value]
        return list(self.multi[key])

    def shared(self, hashes, int threshold):
        """``(over, best)``: each query sharing more than ``threshold`` of ``hashes`` as
        ``(id, shared)``, ascending by id, and the most any query shares (0: none)."""
        cdef const uint64_t[::1] h = _hashes(hashes)
        cdef vector[pair[int64_t, int]] over
        cdef int best = 0
        with nogil:
            best = self._shared(h, threshold, over)
        return [(p.first, p.second) for p in over], best

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef int _shared(self, const uint64_t[::1] h, int threshold,
                     vector[pair[int64_t, int]]& over) noexcept nogil:
        cdef Py_ssize_t i, at
        cdef int best = 0
        cdef int64_t qid
        self.counts.clear()
        for i in range(h.shape[0]):
            at = self._find(h[i])
            if at < 0:
                continue
            if self.slots[at].state == SINGLE:
                self.counts[self.slots[at].value] += 1
                continue
            for qid in self.multi[h[i]]:
                self.counts[qid] += 1
        for entry in self.counts:
            if entry.second > best:
                best = entry.second
            if entry.second > threshold:
                over.push_back(pair[int64_t, int](entry.first, entry.second))
        sort(over.begin(), over.end())
        return best

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef inline Py_ssize_t _find(self, uint64_t h) noexcept nogil:
        """The slot holding ``h``, or -1."""
        cdef size_t mask = self.slots.size() - 1
        cdef size_t i = h & mask
        cdef Slot* slot
        while True:
            slot = &self.slots[i]
            if slot.state == EMPTY:
                return -1
            if slot.key == h:
                return <Py_ssize_t>i
            i = (i + 1) & mask

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef void _insert(self, uint64_t h, int state, int64_t value) noexcept nogil:
        """Put ``h`` (not indexed) in an empty slot, doubling the table past half full."""
        cdef size_t mask, i
        cdef vector[Slot] old
        cdef Slot entry
        if 2 * (self.used + 1) > self.slots.size():
            old.swap(self.slots)
            self.slots.resize(2 * old.size())
            self.used = 0
            for entry in old:
                if entry.state != EMPTY:
                    self._insert(entry.key, entry.state, entry.value)
        mask = self.slots.size() - 1
        i = h & mask
        while self.slots[i].state != EMPTY:
            i = (i + 1) & mask
        self.slots[i].key = h
        self.slots[i].value = value
        self.slots[i].state = state
        self.used += 1

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef void _erase(self, size_t hole) noexcept nogil:
        """Empty slot ``hole`` and shift back the entries of its probe run (no tombstones)."""
        cdef size_t mask = self.slots.size() - 1
        cdef size_t k = hole, ideal
        while True:
            k = (k + 1) & mask
            if self.slots[k].state == EMPTY:
                break
            ideal = self.slots[k].key & mask
            # the entry at k stays unless the hole lies on its way from its ideal slot
            if (hole < k and hole < ideal <= k) or (hole > k and (ideal <= k or ideal > hole)):
                continue
            self.slots[hole] = self.slots[k]
            hole = k
        self.slots[hole].state = EMPTY
        self.used -= 1

    cdef void _add(self, uint64_t h, int64_t qid, Py_ssize_t max_per_hash) noexcept nogil:
        cdef Py_ssize_t at = self._find(h)
        cdef multi_it many
        cdef vector[int64_t]* ids
        cdef vector[int64_t] two
        if at < 0:
            self._insert(h, SINGLE, qid)
            return
        if self.slots[at].state == MANY:
            many = self.multi.find(h)
            if max_per_hash == 1:  # as the twin: a bare id replaces whatever was there
                self.multi.erase(many)
                self.slots[at].state = SINGLE
                self.slots[at].value = qid
                return
            ids = &deref(many).second
            ids.push_back(qid)
            if <Py_ssize_t>ids.size() > max_per_hash:
                ids.erase(ids.begin())
            return
        if max_per_hash == 1:
            self.slots[at].value = qid
            return
        two.push_back(self.slots[at].value)
        two.push_back(qid)
        self.multi[h] = move(two)
        self.slots[at].state = MANY

    cdef void _remove(self, uint64_t h, int64_t qid) noexcept nogil:
        cdef Py_ssize_t at = self._find(h)
        cdef multi_it many
        cdef vector[int64_t]* ids
        cdef Py_ssize_t i
        if at < 0:
            return
        if self.slots[at].state == SINGLE:
            if self.slots[at].value == qid:
                self._erase(at)
            return
        many = self.multi.find(h)
        ids = &deref(many).second
        for i in range(<Py_ssize_t>ids.size()):
            if ids[0][i] == qid:
                ids.erase(ids.begin() + i)
                break
        if ids.size() == 1:
            self.slots[at].state = SINGLE
            self.slots[at].value = ids[0][0]
            self.multi.erase(many)
        elif ids.size() == 0:
            self.multi.erase(many)
            self._erase(at)


def _hashes(hashes):
    """``hashes`` as a contiguous uint64 buffer (an ``array('Q')`` or a uint64 array as is)."""
    if isinstance(hashes, array) and hashes.typecode == "Q":
        return hashes
    if isinstance(hashes, np.ndarray) and hashes.dtype == np.uint64 and hashes.flags.c_contiguous:
        return hashes
    return np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64))
