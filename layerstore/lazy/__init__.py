"""Lazy layers: zstd:chunked and eStargz tables of contents, their writers, the chunk fetcher.

`model` turns a verified TOC into store `Entry`s plus each regular file's chunks;
`zstdchunked` and `estargz` locate, verify and parse their TOC and write such blobs;
`fetch` reads byte ranges of a registry blob and verifies each chunk before it is used.
"""
