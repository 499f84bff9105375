// Command etcd is the stock etcd server, built from the go.etcd.io modules at
// the version kube-apiserver itself requires.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
