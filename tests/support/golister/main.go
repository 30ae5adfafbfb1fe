// Command golister prints each member of a tar read from stdin as Go's archive/tar reads it:
// one JSON object a line (byte strings base64), then {"end":"ok"} or {"error":"..."}.
// The tests compare it with layerfs's own reader (tests/store/test_go_oracle.py).
package main

import (
	"archive/tar"
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"sort"
)

type member struct {
	Type     int         `json:"type"`
	Name     []byte      `json:"name"`
	Linkname []byte      `json:"linkname"`
	Size     int64       `json:"size"`
	Mode     int64       `json:"mode"`
	UID      int         `json:"uid"`
	GID      int         `json:"gid"`
	Mtime    int64       `json:"mtime_s"`
	MtimeNs  int         `json:"mtime_nsec"`
	Devmajor int64       `json:"devmajor"`
	Devminor int64       `json:"devminor"`
	Xattrs   [][2][]byte `json:"xattrs"`
	SHA256   string      `json:"sha256"`
	Read     int64       `json:"read"`
}

func main() {
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	enc := json.NewEncoder(out)
	tr := tar.NewReader(bufio.NewReader(os.Stdin))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			enc.Encode(map[string]string{"end": "ok"})
			return
		}
		if err != nil {
			enc.Encode(map[string]string{"error": err.Error()})
			return
		}
		m := member{
			Type: int(hdr.Typeflag), Name: []byte(hdr.Name), Linkname: []byte(hdr.Linkname),
			Size: hdr.Size, Mode: hdr.Mode, UID: hdr.Uid, GID: hdr.Gid,
			Mtime: hdr.ModTime.Unix(), MtimeNs: hdr.ModTime.Nanosecond(),
			Devmajor: hdr.Devmajor, Devminor: hdr.Devminor, Xattrs: [][2][]byte{},
		}
		keys := make([]string, 0, len(hdr.Xattrs))
		for k := range hdr.Xattrs { //nolint:staticcheck // Xattrs is what the runtimes read
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			m.Xattrs = append(m.Xattrs, [2][]byte{[]byte(k), []byte(hdr.Xattrs[k])})
		}
		h := sha256.New()
		n, err := io.Copy(h, tr)
		m.Read = n
		m.SHA256 = hex.EncodeToString(h.Sum(nil))
		enc.Encode(m)
		if err != nil {
			enc.Encode(map[string]string{"error": err.Error()})
			return
		}
	}
}
