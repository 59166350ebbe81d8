"""The catalog's near-duplicate indexes on disk (<home>/index), kept in step with the catalog."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import psycopg

from lookalike.db.vector_io import VECTOR_CHUNK, chunks, spilled_vectors, vectors_by_id
from lookalike.dedup.pairs import NewImages
from lookalike.index import VectorSearch
from lookalike.index.exact import ExactVectorIndex
from lookalike.index.hamming import HashIndex
from lookalike.index.ivf import TRAIN_SAMPLE, VectorIndex
from lookalike.layout import file_safe
from lookalike.progress import say

# --------------------------------------------------------------------------- indexes on disk


# Up to this many vectors the search is exact (a flat index, 256 MB at 1280-d); beyond, the
# compressed VectorIndex, whose projection and quantiser need that much data to be trained well.
EXACT_UP_TO = 50_000


def new_vector_index(folder: Path, dim: int, size: int, sample: np.ndarray) -> VectorSearch:
    """An empty vector index for `size` vectors in `folder`: exact up to EXACT_UP_TO, else a
    VectorIndex trained on `sample` (TRAIN_SAMPLE vectors are enough; it may be a memory map)."""
    if size <= EXACT_UP_TO:
        return ExactVectorIndex(dim, path=folder / "exact")
    index = VectorIndex(dim, path=folder / "ivf")
    index.train(sample, expected_size=size)
    return index


class DedupIndexes:
    """The catalog's pHash index and the vector index of one model_ver, under <home>/index.

    On disk: phash.npz, and vectors-<model_ver>/exact or /ivf (while the vector index is
    exact, then compressed). Each file is replaced or committed atomically, and an index is
    trusted only as far as it agrees with the catalog (count and sum of its image_ids): a run
    killed between its commit and the save leaves an index behind the catalog, which the next
    open brings up to date.
    """

    HASH_FILE = "phash.npz"

    def __init__(self, folder: Path, model_ver: str, hashes: HashIndex, vectors: VectorSearch) -> None:
        self.folder = folder
        self.model_ver = model_ver
        self.hashes = hashes
        self.vectors = vectors

    @staticmethod
    def vector_folder(folder: Path, model_ver: str) -> Path:
        return folder / ("vectors-" + file_safe(model_ver))

    @classmethod
    def load(cls, folder: Path, model_ver: str, dim: int) -> DedupIndexes:
        """The indexes as last saved, empty ones where there are none (the catalog unchecked)."""
        hash_file = folder / cls.HASH_FILE
        hashes = HashIndex.load(hash_file) if hash_file.exists() else HashIndex()
        vectors = cls._saved_vectors(cls.vector_folder(folder, model_ver), dim, create=True)
        return cls(folder, model_ver, hashes, vectors)

    @staticmethod
    def _saved_vectors(vec_folder: Path, dim: int, create: bool) -> VectorSearch:
        vectors: VectorSearch
        if (vec_folder / "ivf" / VectorIndex.INDEX_FILE).exists():  # saved after its exact one
            vectors = VectorIndex.load(vec_folder / "ivf")
        elif (vec_folder / "exact" / ExactVectorIndex.INDEX_FILE).exists():
            vectors = ExactVectorIndex.load(vec_folder / "exact")
        else:
            vectors = ExactVectorIndex(dim, path=vec_folder / "exact" if create else None)
        if vectors.dim != dim:
            raise ValueError(f"{vec_folder} holds {vectors.dim}-d vectors, not {dim}-d")
        return vectors

    @classmethod
    def read_hashes(cls, conn: psycopg.Connection, folder: Path) -> HashIndex:
        """The pHash index for a search, nothing written: as saved when it agrees with the
        catalog, else made in memory from image_hashes (8 bytes an image)."""
        hash_file = folder / cls.HASH_FILE
        return _in_step(conn, HashIndex.load(hash_file) if hash_file.exists() else HashIndex())

    @classmethod
    def read_vectors(cls, conn: psycopg.Connection, folder: Path, model_ver: str,
                     dim: int) -> tuple[VectorSearch, str | None]:
        """The vector index for a search, nothing written: as the last run saved it, with a note
        when it lags behind the catalog (a run loading now, or killed before its save)."""
        vectors = cls._saved_vectors(cls.vector_folder(folder, model_ver), dim, create=False)
        count, total = conn.execute("SELECT count(*), coalesce(sum(image_id), 0) FROM image_embeddings "
                                    "WHERE model_ver = %s", (model_ver,)).fetchone()
        if (len(vectors), int(vectors.ids.sum())) == (count, total):
            return vectors, None
        return vectors, (f"the near-duplicate index holds {len(vectors)} of the catalog's {count} vectors "
                         "(a run is loading, or was killed: the next run brings it up to date)")

    @classmethod
    def open(cls, conn: psycopg.Connection, folder: Path, model_ver: str, dim: int,
             vector_type: str) -> DedupIndexes:
        """The saved indexes, brought up to date with the catalog."""
        try:
            index = cls.load(folder, model_ver, dim)
        except Exception as e:  # whatever is wrong with them, they are rebuilt
            say(f"dedup: the saved indexes are unusable ({e}); rebuilding them")
            shutil.rmtree(folder, ignore_errors=True)
            index = cls.load(folder, model_ver, dim)
        index._sync_hashes(conn)
        index._sync_vectors(conn, vector_type)
        for other in folder.glob("vectors-*"):  # of models the catalog has left: GBs at 1M
            if other != cls.vector_folder(folder, model_ver):
                shutil.rmtree(other, ignore_errors=True)
        return index

    def _sync_hashes(self, conn: psycopg.Connection) -> None:
        current = _in_step(conn, self.hashes)
        if current is not self.hashes:
            say(f"dedup: indexed the catalog's {len(current)} pHashes")
            self.hashes = current
            self._save_hashes()

    def _sync_vectors(self, conn: psycopg.Connection, vector_type: str) -> None:
        count, total = conn.execute("SELECT count(*), coalesce(sum(image_id), 0) FROM image_embeddings "
                                    "WHERE model_ver = %s", (self.model_ver,)).fetchone()
        if (len(self.vectors), int(self.vectors.ids.sum())) == (count, total):
            return
        stored = np.asarray([r[0] for r in conn.execute(
            "SELECT image_id FROM image_embeddings WHERE model_ver = %s", (self.model_ver,))], np.int64)
        missing = np.setdiff1d(stored, self.vectors.ids)
        if np.isin(self.vectors.ids, stored).all() and len(missing) <= len(self.vectors):
            # Behind the catalog (a run killed before its save): add what it lacks.
            say(f"dedup: adding {len(missing)} vectors the index lacks")
            with conn.cursor() as cur:
                for start in range(0, len(missing), VECTOR_CHUNK):
                    self._add_vectors(*vectors_by_id(cur, self.model_ver, vector_type,
                                                      missing[start:start + VECTOR_CHUNK]))
        else:
            say(f"dedup: indexing the catalog's {count} vectors")
            self._rebuild_vectors(conn, vector_type)
        self._save_vectors()

    def _rebuild_vectors(self, conn: psycopg.Connection, vector_type: str) -> None:
        folder = self.vector_folder(self.folder, self.model_ver)
        shutil.rmtree(folder, ignore_errors=True)
        with spilled_vectors(conn, self.model_ver, vector_type, self.folder / "scratch") as (ids, vecs):
            self.vectors = new_vector_index(folder, self.vectors.dim, len(ids),  # trained on a view
                                            vecs[::max(1, len(ids) // TRAIN_SAMPLE)])
            start = 0
            for chunk in chunks(vecs):
                self.vectors.add(ids[start:start + len(chunk)], chunk)
                start += len(chunk)

    def _add_vectors(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if isinstance(self.vectors, ExactVectorIndex) and len(self.vectors) + len(ids) > EXACT_UP_TO:
            # Outgrown: the compressed index, trained on the vectors so far and these.
            known = self.vectors.vectors()
            sample = np.concatenate([known, vecs])
            index = new_vector_index(self.vector_folder(self.folder, self.model_ver), self.vectors.dim,
                                     len(sample), sample)
            index.add(self.vectors.ids, known)
            self.vectors = index
        self.vectors.add(ids, vecs)

    def commit(self, new: NewImages) -> None:
        """After the manifest's transaction committed: the new images become searchable."""
        self.hashes.add(new.ids, new.phash)
        self._add_vectors(new.ids[new.has_vector], new.vectors[new.has_vector])
        self.save()

    def _save_hashes(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hashes.save(self.folder / self.HASH_FILE)

    def _save_vectors(self) -> None:
        folder = self.vector_folder(self.folder, self.model_ver)
        if len(self.vectors) == 0:
            return  # nothing to keep (and VectorIndex cannot save untrained)
        kind = "ivf" if isinstance(self.vectors, VectorIndex) else "exact"
        self.vectors.save(folder / kind)
        if kind == "ivf":
            shutil.rmtree(folder / "exact", ignore_errors=True)  # outgrown, now that ivf is saved

    def save(self) -> None:
        self._save_hashes()
        self._save_vectors()


def _in_step(conn: psycopg.Connection, hashes: HashIndex) -> HashIndex:
    """`hashes` when it agrees with the catalog (count and sum of image_ids), else the pHash index
    made anew from image_hashes."""
    count, total = conn.execute("SELECT count(*), coalesce(sum(image_id), 0) FROM image_hashes").fetchone()
    if (len(hashes), int(hashes.ids.sum())) == (count, total):
        return hashes
    rows = conn.execute("SELECT image_id, phash64 FROM image_hashes ORDER BY image_id").fetchall()
    return HashIndex(np.asarray([r[0] for r in rows], np.int64), np.asarray([r[1] for r in rows], np.int64))
