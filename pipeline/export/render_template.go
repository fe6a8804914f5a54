// Renders an Ollama-style TEMPLATE with Go's text/template, the engine Ollama uses.
// Input: a JSON file {"template": "...", "conversations": [[{"Role": "...", "Content": "..."}]]}.
// Output: a JSON list with one rendered string per conversation.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type request struct {
	Template      string      `json:"template"`
	Conversations [][]Message `json:"conversations"`
}

func main() {
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var req request
	if err := json.Unmarshal(raw, &req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	tmpl, err := template.New("modelfile").Parse(req.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out := []string{}
	for _, conv := range req.Conversations {
		var b strings.Builder
		data := map[string]any{"Messages": conv, "System": "", "Prompt": "", "Response": ""}
		if err := tmpl.Execute(&b, data); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		out = append(out, b.String())
	}
	enc, _ := json.Marshal(out)
	fmt.Println(string(enc))
}
