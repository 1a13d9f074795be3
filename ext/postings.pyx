# cython: language_level=3, embedsignature=True
# distutils: language = c++
"""Blacklight's inverted index in C++ containers: hash -> ascending query ids.

Semantics are those of :class:`guard._py.postings.PostingIndex` (its module docstring
states them); after every operation this index holds the same postings as its twin, and
:meth:`PostingIndex.shared` returns the same result. Most hashes belong to one query, so
a hash with one posting lives in ``single`` (one map entry, no allocation of its own) and
moves to ``multi`` (a vector) when a second query shares it. A lookup, an insert and a
removal are each one pass over the fingerprint's hashes without touching Python objects.
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

ctypedef unordered_map[uint64_t, int64_t].iterator single_it
ctypedef unordered_map[uint64_t, vector[int64_t]].iterator multi_it


cdef class PostingIndex:
    cdef unordered_map[uint64_t, int64_t] single
    cdef unordered_map[uint64_t, vector[int64_t]] multi
    cdef unordered_map[int64_t, int] counts  # shared(): reused, so no allocation per call

    def __len__(self):
        return self.single.size() + self.multi.size()

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
        if self.single.count(key):
            return [self.single[key]]
        if self.multi.count(key):
            return list(self.multi[key])
        return []

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
        cdef Py_ssize_t i
        cdef int best = 0
        cdef int64_t qid
        cdef single_it found
        cdef multi_it many
        self.counts.clear()
        for i in range(h.shape[0]):
            found = self.single.find(h[i])
            if found != self.single.end():
                self.counts[deref(found).second] += 1
                continue
            many = self.multi.find(h[i])
            if many != self.multi.end():
                for qid in deref(many).second:
                    self.counts[qid] += 1
        for entry in self.counts:
            if entry.second > best:
                best = entry.second
            if entry.second > threshold:
                over.push_back(pair[int64_t, int](entry.first, entry.second))
        sort(over.begin(), over.end())
        return best

    cdef void _add(self, uint64_t h, int64_t qid, Py_ssize_t max_per_hash) noexcept nogil:
        cdef multi_it many = self.multi.find(h)
        cdef single_it found
        cdef vector[int64_t]* ids
        cdef vector[int64_t] two
        if many != self.multi.end():
            if max_per_hash == 1:  # as the twin: a bare id replaces whatever was there
                self.multi.erase(many)
                self.single[h] = qid
                return
            ids = &deref(many).second
            ids.push_back(qid)
            if <Py_ssize_t>ids.size() > max_per_hash:
                ids.erase(ids.begin())
            return
        found = self.single.find(h)
        if found == self.single.end() or max_per_hash == 1:
            self.single[h] = qid
            return
        two.push_back(deref(found).second)
        two.push_back(qid)
        self.single.erase(found)
        self.multi[h] = move(two)

    cdef void _remove(self, uint64_t h, int64_t qid) noexcept nogil:
        cdef single_it found = self.single.find(h)
        cdef multi_it many
        cdef vector[int64_t]* ids
        cdef Py_ssize_t i
        if found != self.single.end():
            if deref(found).second == qid:
                self.single.erase(found)
            return
        many = self.multi.find(h)
        if many == self.multi.end():
            return
        ids = &deref(many).second
        for i in range(<Py_ssize_t>ids.size()):
            if ids[0][i] == qid:
                ids.erase(ids.begin() + i)
                break
        if ids.size() == 1:
            self.single[h] = ids[0][0]
            self.multi.erase(many)
        elif ids.size() == 0:
            self.multi.erase(many)


def _hashes(hashes):
    """``hashes`` as a contiguous uint64 buffer (an ``array('Q')`` or a uint64 array as is)."""
    if isinstance(hashes, array) and hashes.typecode == "Q":
        return hashes
    if isinstance(hashes, np.ndarray) and hashes.dtype == np.uint64 and hashes.flags.c_contiguous:
        return hashes
    return np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64))
