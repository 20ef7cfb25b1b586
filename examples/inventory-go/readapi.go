package main

// The HTTP read API (contract section 8): the gateway reads items through it, at the URL the
// declaration advertises. Reads run in bbolt read transactions, which never block the writer.

import (
	"fmt"
	"log"
	"net/http"
	"sort"
	"sync/atomic"
)

// ReadAPI serves the read model of every declared entity type (here only `item`).
type ReadAPI struct {
	store *Store
	// ready is true while the service consumes commands: /healthz answers 503 before and after.
	ready atomic.Bool
}

func (a *ReadAPI) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /entities/{type}/{id}", a.current)
	mux.HandleFunc("GET /entities/{type}/{id}/versions", a.versions)
	mux.HandleFunc("GET /entities/{type}", a.list)
	mux.HandleFunc("GET /healthz", a.healthz)
	return mux
}

func writeJSON(w http.ResponseWriter, status int, body any) {
	raw, err := marshalJSON(body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	if _, err := w.Write(raw); err != nil {
		log.Printf("read api: %v", err)
	}
}

func writeError(w http.ResponseWriter, status int, code, message string) {
	writeJSON(w, status, map[string]any{"error": map[string]any{"code": code, "message": message}})
}

// knownType answers 404 UNKNOWN_ENTITY_TYPE for a type the service does not serve.
func knownType(w http.ResponseWriter, r *http.Request) bool {
	if t := r.PathValue("type"); t != itemType {
		writeError(w, http.StatusNotFound, "UNKNOWN_ENTITY_TYPE",
			fmt.Sprintf("%s has no entities of type %q; it serves: %s", serviceName, t, itemType))
		return false
	}
	return true
}

func (a *ReadAPI) current(w http.ResponseWriter, r *http.Request) {
	if !knownType(w, r) {
		return
	}
	id := r.PathValue("id")
	var latest *itemVersion
	if err := a.store.View(func(tx *Tx) (err error) { latest, err = tx.LatestItem(id); return }); err != nil {
		writeError(w, http.StatusInternalServerError, "STORE", err.Error())
		return
	}
	state := latest.state()
	if state == nil {
		writeError(w, http.StatusNotFound, "NOT_FOUND", fmt.Sprintf("no current item %s in %s: check the id; "+
			"if it was removed, its history is at /entities/item/%s/versions", id, serviceName, id))
		return
	}
	writeJSON(w, http.StatusOK, state)
}

func (a *ReadAPI) versions(w http.ResponseWriter, r *http.Request) {
	if !knownType(w, r) {
		return
	}
	id := r.PathValue("id")
	var history []itemVersion
	if err := a.store.View(func(tx *Tx) (err error) { history, err = tx.ItemVersions(id); return }); err != nil {
		writeError(w, http.StatusInternalServerError, "STORE", err.Error())
		return
	}
	if len(history) == 0 {
		writeError(w, http.StatusNotFound, "NOT_FOUND", fmt.Sprintf("%s has never had an item %s", serviceName, id))
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"entity_type": itemType, "id": id, "versions": history})
}

// list answers `?run_id=X` with the current state of every item whose current version run X
// wrote (the state's run_id field equals X, as the filter reads). Removed items read as absent
// here as everywhere; their history stays under /versions.
func (a *ReadAPI) list(w http.ResponseWriter, r *http.Request) {
	if !knownType(w, r) {
		return
	}
	query := r.URL.Query()
	runIDs, ok := query["run_id"]
	if len(query) != 1 || !ok || len(runIDs) != 1 || runIDs[0] == "" {
		writeError(w, http.StatusBadRequest, "UNKNOWN_FILTER",
			"list items by exactly one field of: run_id, e.g. /entities/item?run_id=<run id>")
		return
	}
	runID := runIDs[0]
	states := []*itemVersion{}
	err := a.store.View(func(tx *Tx) error {
		// The run index holds every item the run ever wrote; keep those whose current version it wrote.
		for _, id := range tx.ItemsOfRun(runID) {
			latest, err := tx.LatestItem(id)
			if err != nil {
				return err
			}
			if s := latest.state(); s != nil && s.RunID != nil && *s.RunID == runID {
				states = append(states, s)
			}
		}
		return nil
	})
	if err != nil {
		writeError(w, http.StatusInternalServerError, "STORE", err.Error())
		return
	}
	sort.Slice(states, func(i, j int) bool { return states[i].ID < states[j].ID })
	writeJSON(w, http.StatusOK, states)
}

func (a *ReadAPI) healthz(w http.ResponseWriter, _ *http.Request) {
	err := a.store.View(func(*Tx) error { return nil })
	if err != nil || !a.ready.Load() {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"status": "unavailable"})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "service": serviceName})
}
