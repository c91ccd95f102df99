module example.com/echo-go

go 1.26.8

require github.com/hyphae-run/hyphae v0.0.0

replace github.com/hyphae-run/hyphae => ../..
