package main

// The service's declaration on kinshasa.catalogue (contract section 9): what the gateway grows its
// GraphQL mutations from. The payload schemas here are also what handlers.go validates against, so
// the gateway and the service refuse exactly the same payloads.

import (
	"crypto/sha256"
	"encoding/hex"
)

const (
	serviceName = "inventory"
	// declarationVersion is bumped whenever anything digested below changes: the gateway refuses
	// the same version with a different content.
	declarationVersion = 1
	itemType           = "item"
)

const serviceDescription = "Inventory items: add an item, adjust its stock, rename it."

// Operation names as they appear in command types: `inventory.add_item`.
const (
	opAddItem     = "add_item"
	opAdjustStock = "adjust_stock"
	opRenameItem  = "rename_item"
)

// An entity id as the gateway hands it out (a UUID), or any id the kit's own services would accept.
var itemIDSchema = map[string]any{
	"type": "string", "minLength": 1, "maxLength": 128,
	"description": "id of an item, as returned when it was added",
}

var itemNameSchema = map[string]any{
	"type": "string", "minLength": 1, "maxLength": 200, "description": "what people call the item",
}

// operations is the `operations` array of the declaration, in a stable order.
var operations = []any{
	map[string]any{
		"name":            opAddItem,
		"mutation":        "addItem",
		"description":     "Add an item to the inventory with an opening quantity; returns its id at once.",
		"entity_type":     itemType,
		"entity_id_field": nil,
		"payload_schema": map[string]any{
			"type": "object", "additionalProperties": false,
			"properties": map[string]any{
				"sku": map[string]any{
					"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Z0-9-]+$",
					"description": "stock-keeping unit: upper-case letters, digits and '-'",
					"errorMessage": map[string]any{
						"pattern": "must be upper-case letters, digits and '-' only, e.g. WIDGET-42",
					},
				},
				"name": itemNameSchema,
				"quantity": map[string]any{
					"type": "integer", "minimum": 0, "maximum": 1000000, "default": 0,
					"description": "opening stock",
				},
			},
			"required": []any{"sku", "name"},
			"examples": []any{map[string]any{"sku": "WIDGET-42", "name": "Blue widget", "quantity": 10}},
		},
		"inverse": map[string]any{
			"name":        "remove_added_item",
			"description": "Remove the item it added, if its name and quantity are unchanged since.",
		},
		"egress":   false,
		"window_s": nil,
	},
	map[string]any{
		"name":            opAdjustStock,
		"mutation":        "adjustStock",
		"description":     "Add to (positive delta) or take from (negative delta) an item's stock; never below 0.",
		"entity_type":     itemType,
		"entity_id_field": "item_id",
		"payload_schema": map[string]any{
			"type": "object", "additionalProperties": false,
			"properties": map[string]any{
				"item_id": itemIDSchema,
				"delta": map[string]any{
					"type": "integer", "minimum": -1000000, "maximum": 1000000,
					"not":          map[string]any{"const": 0},
					"description":  "how many units to add (positive) or take away (negative)",
					"errorMessage": map[string]any{"not": "must not be zero: an adjustment of 0 changes nothing"},
				},
				"reason": map[string]any{
					"type": "string", "maxLength": 200, "description": "why the stock changed, for the history",
				},
			},
			"required": []any{"item_id", "delta"},
			"examples": []any{map[string]any{"item_id": "ITEM-ID", "delta": 5, "reason": "restock"}},
		},
		"inverse": map[string]any{
			"name":        "restore_quantity",
			"description": "Set the quantity back to what it was, if nothing changed it since.",
		},
		"egress":   false,
		"window_s": nil,
	},
	map[string]any{
		"name":            opRenameItem,
		"mutation":        "renameItem",
		"description":     "Give an item a new name.",
		"entity_type":     itemType,
		"entity_id_field": "item_id",
		"payload_schema": map[string]any{
			"type": "object", "additionalProperties": false,
			"properties": map[string]any{
				"item_id": itemIDSchema,
				"name":    itemNameSchema,
			},
			"required": []any{"item_id", "name"},
			"examples": []any{map[string]any{"item_id": "ITEM-ID", "name": "Red widget"}},
		},
		"inverse": map[string]any{
			"name":        "restore_name",
			"description": "Give the item its old name back, if nobody renamed it since.",
		},
		"egress":   false,
		"window_s": nil,
	},
}

var entities = []any{
	map[string]any{
		"type": itemType,
		"schema": map[string]any{
			"type": "object", "additionalProperties": false,
			"properties": map[string]any{
				"id":          map[string]any{"type": "string"},
				"version":     map[string]any{"type": "integer", "minimum": 1},
				"sku":         map[string]any{"type": "string"},
				"name":        map[string]any{"type": "string"},
				"quantity":    map[string]any{"type": "integer", "minimum": 0},
				"status":      map[string]any{"type": "string", "enum": []any{"active", "removed"}},
				"run_id":      map[string]any{"type": []any{"string", "null"}},
				"command_id":  map[string]any{"type": "string"},
				"actor":       map[string]any{"type": "string", "description": "`<kind>:<id>` of who wrote this version"},
				"recorded_at": map[string]any{"type": "string", "format": "date-time"},
			},
			"required": []any{"id", "version", "sku", "name", "quantity", "status", "run_id",
				"command_id", "actor", "recorded_at"},
		},
		"list_by": []any{"run_id"},
	},
}

// payloadSchema is the declared payload schema of an operation, or nil for an unknown one.
func payloadSchema(operation string) map[string]any {
	for _, op := range operations {
		op := op.(map[string]any)
		if op["name"] == operation {
			return op["payload_schema"].(map[string]any)
		}
	}
	return nil
}

func operationNames() []string {
	names := make([]string, 0, len(operations))
	for _, op := range operations {
		names = append(names, serviceName+"."+op.(map[string]any)["name"].(string))
	}
	return names
}

// digest is `sha256:` + hex SHA-256 of the canonical form: only service, version, description,
// operations and entities, keys sorted (Go sorts map keys when encoding), no whitespace, UTF-8
// left as is and <, >, & not escaped (marshalJSON). One Go quirk remains: encoding/json escapes
// U+2028 and U+2029, which Python leaves raw; none appears in this declaration.
func digest() (string, error) {
	canonical, err := marshalJSON(map[string]any{
		"service":     serviceName,
		"version":     declarationVersion,
		"description": serviceDescription,
		"operations":  operations,
		"entities":    entities,
	})
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(canonical)
	return "sha256:" + hex.EncodeToString(sum[:]), nil
}

// declaration is the record value published on kinshasa.catalogue, keyed by the service name.
func declaration(readURL string) ([]byte, error) {
	d, err := digest()
	if err != nil {
		return nil, err
	}
	return marshalJSON(map[string]any{
		"kind":        "kinshasa.service/v1",
		"service":     serviceName,
		"version":     declarationVersion,
		"digest":      d,
		"description": serviceDescription,
		"endpoints":   map[string]any{"read": readURL},
		"operations":  operations,
		"entities":    entities,
	})
}
