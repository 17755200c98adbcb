"""Minimal reader for R's serialisation format (XDR, versions 2 and 3) and lazy-load
databases (an R package's data/Rdata.rdx + Rdata.rdb), enough to pull character vectors
out of a data package. Python standard library only.

R types read: NULL, symbols, pairlists, character/logical/integer/double vectors, lists,
attributes and the reference table. Anything else raises ValueError naming the type.
"""
import bz2, gzip, lzma, struct, zlib

NILVALUE, GLOBALENV, EMPTYENV, BASEENV, REFSXP = 254, 253, 242, 241, 255
MISSINGARG, UNBOUNDVALUE, BASENAMESPACE = 251, 252, 250
SYMSXP, LISTSXP, LANGSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 6, 9, 10, 13, 14, 16, 19


class RList(list):
    """An R list (VECSXP) or pairlist; .attrs holds its attributes (names etc.)."""
    attrs = None


class RVector(list):
    attrs = None


class Reader:
    def __init__(self, data):
        self.b, self.p, self.refs = data, 0, []

    def int(self):
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def length(self):
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self):
        fmt = self.b[:2]
        if fmt != b"X\n":
            raise ValueError("not an XDR R serialisation (header %r)" % fmt)
        self.p = 2
        version = self.int()
        self.int(); self.int()  # writer's R version, minimal reader version
        if version == 3:
            n = self.int()
            self.p += n  # native encoding name
        elif version != 2:
            raise ValueError("R serialisation version %d" % version)

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if t in (NILVALUE, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG, UNBOUNDVALUE, BASENAMESPACE):
            return None
        if t == REFSXP:
            i = flags >> 8
            if i == 0:
                i = self.int()
            return self.refs[i - 1]
        if t == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if t in (LISTSXP, LANGSXP):
            out = RList()
            attrs = None
            while True:
                if has_attr:
                    a = self.item()
                    attrs = attrs or a
                tag = self.item() if has_tag else None
                out.append((tag, self.item()))
                # the CDR is read in the loop instead of by recursion (long pairlists)
                flags = self.int()
                t = flags & 0xFF
                if t == NILVALUE:
                    break
                if t not in (LISTSXP, LANGSXP):
                    raise ValueError("improper pairlist (CDR type %d)" % t)
                has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
            out.attrs = attrs
            return out
        if t == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            s = self.b[self.p:self.p + n]
            self.p += n
            # levels bit 2 marks a latin-1 string; everything else here is UTF-8 or ASCII
            return s.decode("latin-1" if (flags >> 12) & 4 else "utf-8", errors="replace")
        if t in (LGLSXP, INTSXP):
            n = self.length()
            v = RVector(struct.unpack_from(">%di" % n, self.b, self.p))
            self.p += 4 * n
        elif t == REALSXP:
            n = self.length()
            v = RVector(struct.unpack_from(">%dd" % n, self.b, self.p))
            self.p += 8 * n
        elif t == STRSXP:
            n = self.length()
            v = RVector(self.item() for _ in range(n))
        elif t == VECSXP:
            n = self.length()
            v = RList(self.item() for _ in range(n))
        else:
            raise ValueError("R type %d is not supported by this reader" % t)
        if has_attr:
            v.attrs = self.item()
        return v


def unserialize(data):
    r = Reader(data)
    r.header()
    return r.item()


def names_of(obj):
    for tag, val in (obj.attrs or []):
        if tag == "names":
            return list(val)
    return None


def lazyload(rdx_path, rdb_path):
    """Returns {variable name: object} for every variable of a lazy-load database."""
    with gzip.open(rdx_path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"X\n":  # saveRDS output may be compressed twice over
        raw = zlib.decompress(raw[4:])
    index = unserialize(raw)
    top = dict(zip(names_of(index), index))
    variables = top["variables"]
    blob = open(rdb_path, "rb").read()
    out = {}
    for name, (off, ln) in zip(names_of(variables), variables):
        chunk = blob[off:off + ln]
        n = struct.unpack_from(">I", chunk, 0)[0]
        kind, body = chunk[4:5], chunk[5:]
        if kind == b"Z":
            data = lzma.decompress(body) if body[:1] == b"\xfd" else zlib.decompress(body)
        elif kind == b"2":
            data = bz2.decompress(body)
        elif kind == b"X":
            data = lzma.decompress(body)
        elif kind == b"0":
            data = body
        else:  # type 1 compression: zlib stream straight after the length
            data = zlib.decompress(chunk[4:])
        if len(data) != n:
            raise ValueError("%s: %d bytes, expected %d" % (name, len(data), n))
        out[name] = unserialize(data)
    return out
